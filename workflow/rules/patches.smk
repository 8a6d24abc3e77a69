# Annotations -> typed patch sets (one job per annotated slide), or a patch dataset -> one typed patch set
# per group (slides.source patches), and the train/test split.

if PATCH_SOURCE:

    # one job per group: a group is the {slide} of every later rule, so each set is made, re-made and
    # scheduled on its own, like rasterize's; each job re-reads the (cheap) list of file names to check
    # that every name matches the group regex
    rule import_patches:
        input:
            lambda wc: PATCH_FILES[wc.slide],
        output:
            patches=directory(f"{RESULTS}/patches/{{slide}}"),
            overlay=report(
                f"{RESULTS}/qc/overlays/{{slide}}.png",
                caption="../report/qc_overlay.rst",
                category="1. Annotations",
            ),
        log:
            f"{RESULTS}/logs/import_patches/{{slide}}.log",
        conda:
            CPU_ENV
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            # a function: the patterns' {stem} is not a wildcard
            flags=lambda wc: flags("import-patches"),
        shell:
            "python -m histosynth import-patches {output.patches:q} --group {wildcards.slide:q}"
            " {params.flags} --overlay {output.overlay:q} > {log:q} 2>&1"

    ruleorder: import_patches > rasterize


rule rasterize:
    input:
        annotations=lambda wc: slide_annotations(wc.slide),
        tiles=f"{RESULTS}/tiles/{{slide}}",
        regions=slide_regions,
    output:
        patches=directory(f"{RESULTS}/patches/{{slide}}"),
        overlay=report(
            f"{RESULTS}/qc/overlays/{{slide}}.png",
            caption="../report/qc_overlay.rst",
            category="1. Annotations",
        ),
    log:
        f"{RESULTS}/logs/rasterize/{{slide}}.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        flags=flags("rasterize"),
        regions=regions_flag,
    shell:
        "python -m histosynth rasterize {input.annotations:q} {input.tiles:q} {output.patches:q}"
        " {params.flags} {params.regions} --overlay {output.overlay:q} > {log:q} 2>&1"


rule split:
    output:
        f"{RESULTS}/split.csv",
    log:
        f"{RESULTS}/logs/split.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        # what the Snakefile's own split (SPLIT_OF) was computed from: histosynth.patches.split.split_inputs
        slides=quoted(SPLIT_INPUTS["slides"]),
        flags=flags("split"),
        groups=split_groups(),
    shell:
        "python -m histosynth split {output:q} --slides {params.slides} {params.flags} {params.groups}"
        " > {log:q} 2>&1"


rule patches:
    input:
        expand(f"{RESULTS}/patches/{{slide}}", slide=ANNOTATED),
        expand(f"{RESULTS}/qc/overlays/{{slide}}.png", slide=ANNOTATED),
        f"{RESULTS}/split.csv",
