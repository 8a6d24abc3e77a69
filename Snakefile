# histosynth: the DAG. Logic lives in src/histosynth; rules are thin CLI calls.
# See README.md for how to run it and ../DESIGN.md (shared) for the stages.


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/gan.smk"
include: "workflow/rules/segmentation.smk"
include: "workflow/rules/multifocus.smk"


rule all:
    default_target: True
    input:
        rules.patches.input,
        rules.masks.input,
        rules.synthetic.input,
        rules.report.output,
