# The multifocus branch (issue #20; off the default path: `snakemake multifocus`): z-stack slides -> cell
# stacks (train slides augmented, the held-out slides not) -> MI-GAN G1 and G2 -> synthetic stacks and two
# baselines -> evaluate-stacks against the held-out slides' real stacks.
import glob as _glob

MF = config["multifocus"]
MIGAN = config["migan"]
MF_DIR = f"{RESULTS}/multifocus"
if MF["source"] == "demo":
    MF_SLIDES = [
        f"{MF_DIR}/demo/zstack-{i:02d}.ome.tif" for i in range(MF["demo"]["n_slides"])
    ]
else:
    MF_SLIDES = sorted(_glob.glob(MF["images"] or ""))
MF_ERROR = None
if MF["source"] == "glob" and not MF["images"]:
    MF_ERROR = HistosynthError(
        "multifocus.source is glob but multifocus.images is not set"
    )
elif len(MF_SLIDES) <= MF["test_slides"]:
    MF_ERROR = HistosynthError(
        f"the multifocus branch holds out multifocus.test_slides = {MF['test_slides']} slide(s) and trains on the "
        f"rest, but there are {len(MF_SLIDES)} z-stack slide(s)"
        + ("" if MF["source"] == "demo" else f" matching {MF['images']!r}")
    )
MF_SPLIT = {
    "train": MF_SLIDES[: len(MF_SLIDES) - MF["test_slides"]],
    "test": MF_SLIDES[len(MF_SLIDES) - MF["test_slides"] :],
}
MF_SETS = {
    "migan": f"{MF_DIR}/synthetic/migan",
    "copy": f"{MF_DIR}/synthetic/copy",
    "blur": f"{MF_DIR}/synthetic/blur",
}


def mf_slides(wildcards):
    """The z-stack slides of one split (raises the branch's start-up error, when the branch is asked for)."""
    if MF_ERROR is not None:
        raise MF_ERROR
    return MF_SPLIT[wildcards.split]


rule demo_zstacks:
    output:
        slides=[s for s in MF_SLIDES] if MF["source"] == "demo" else [],
        cells=f"{MF_DIR}/demo/cells.csv",
    log:
        f"{RESULTS}/logs/multifocus/demo_zstacks.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        out=lambda w, output: os.path.dirname(output.cells),
        flags=flags("demo-zstack"),
    shell:
        "python -m histosynth demo-zstack {params.out:q} {params.flags} > {log:q} 2>&1"


rule extract_stacks:
    input:
        mf_slides,
    output:
        directory(f"{MF_DIR}/stacks/{{split}}"),
    log:
        f"{RESULTS}/logs/multifocus/extract_stacks_{{split}}.log",
    wildcard_constraints:
        split="train|test",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        # the train slides' stacks take the paper's augmentation when multifocus.augment; test stacks never
        augment=lambda w: (
            "--augment" if w.split == "train" and MF["augment"] else "--no-augment"
        ),
        flags=flags("extract-stacks", "--augment"),
    shell:
        "python -m histosynth extract-stacks {input:q} {output:q} {params.augment} {params.flags} > {log:q} 2>&1"


rule train_migan_g1:
    input:
        f"{MF_DIR}/stacks/train",
    output:
        model=f"{MF_DIR}/models/g1/g1.pt",
        log_csv=f"{MF_DIR}/models/g1/log.csv",
    log:
        f"{RESULTS}/logs/multifocus/train_migan_g1.log",
    conda:
        GPU_ENV
    threads: MIGAN["threads"]
    resources:
        gpu=GPU,
        mem_mb=MIGAN["mem_mb"],
        runtime=MIGAN["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output.model),
        flags=flags("train-migan-g1", "--threads"),
    shell:
        "python -m histosynth train-migan-g1 {input:q} {params.out:q} {params.flags} --threads {threads}"
        " > {log:q} 2>&1"


rule train_migan_g2:
    input:
        stacks=f"{MF_DIR}/stacks/train",
        g1=f"{MF_DIR}/models/g1/g1.pt",
    output:
        model=f"{MF_DIR}/models/g2/g2.pt",
        log_csv=f"{MF_DIR}/models/g2/log.csv",
    log:
        f"{RESULTS}/logs/multifocus/train_migan_g2.log",
    conda:
        GPU_ENV
    threads: MIGAN["threads"]
    resources:
        gpu=GPU,
        mem_mb=MIGAN["mem_mb"],
        runtime=MIGAN["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output.model),
        flags=flags("train-migan-g2", "--threads"),
    shell:
        "python -m histosynth train-migan-g2 {input.stacks:q} {params.out:q} --g1 {input.g1:q} {params.flags}"
        " --threads {threads} > {log:q} 2>&1"


rule sample_stacks:
    input:
        g1=f"{MF_DIR}/models/g1/g1.pt",
        g2=f"{MF_DIR}/models/g2/g2.pt",
    output:
        stacks=directory(MF_SETS["migan"]),
        g1_images=directory(f"{MF_DIR}/synthetic/g1-images"),
    log:
        f"{RESULTS}/logs/multifocus/sample_stacks.log",
    conda:
        GPU_ENV
    threads: MIGAN["threads"]
    resources:
        gpu=GPU,
        mem_mb=MIGAN["mem_mb"],
        runtime=60,
    params:
        flags=flags("sample-stacks", "--threads"),
    shell:
        "python -m histosynth sample-stacks {input.g1:q} {input.g2:q} {output.stacks:q}"
        " --g1-out {output.g1_images:q} {params.flags} --threads {threads} > {log:q} 2>&1"


# The baselines MI-GAN must beat, on G1's own images: every plane a copy of it, or it blurred by the train
# stacks' mean focus curve (fitted on the train stacks, never on the held-out ones)
rule stack_baselines:
    input:
        real=f"{MF_DIR}/stacks/train",
        base=f"{MF_DIR}/synthetic/g1-images",
    output:
        directory(f"{MF_DIR}/synthetic/{{kind}}"),
    log:
        f"{RESULTS}/logs/multifocus/stack_baselines_{{kind}}.log",
    wildcard_constraints:
        kind="copy|blur",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        flags=flags("stack-baselines"),
    shell:
        "python -m histosynth stack-baselines {input.real:q} {output:q} --kind {wildcards.kind}"
        " --base {input.base:q} {params.flags} > {log:q} 2>&1"


rule evaluate_stacks:
    input:
        real=f"{MF_DIR}/stacks/test",
        generated=list(MF_SETS.values()),
    output:
        evaluation=f"{MF_DIR}/evaluation/evaluation.json",
        table=f"{MF_DIR}/evaluation/table.md",
        montage=report(
            f"{MF_DIR}/evaluation/montage.png",
            caption="../report/multifocus_montage.rst",
            category="9. Multi-focus cells",
        ),
    log:
        f"{RESULTS}/logs/multifocus/evaluate_stacks.log",
    conda:
        GPU_ENV
    threads: MF["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        out=lambda w, output: os.path.dirname(output.evaluation),
        names=" ".join(MF_SETS),
        flags=flags("evaluate-stacks", "--threads"),
    shell:
        "python -m histosynth evaluate-stacks {input.real:q} {input.generated:q} {params.out:q}"
        " --names {params.names} {params.flags} --threads {threads} > {log:q} 2>&1"


rule multifocus:
    input:
        rules.evaluate_stacks.output,
        f"{MF_DIR}/models/g2/log.csv",
