# Tiling: one job per slide, slide -> patch set of image tiles.


rule tile:
    input:
        slide=slide_image,
        annotations=lambda wc: (
            slide_annotations(wc.slide) if TILE["restrict_to_annotations"] else []
        ),
    output:
        directory(f"{RESULTS}/tiles/{{slide}}"),
    log:
        f"{RESULTS}/logs/tile/{{slide}}.log",
    conda:
        CPU_ENV
    threads: TILE["threads"]
    resources:
        mem_mb=TILE["mem_mb"],
        runtime=TILE["runtime"],
    params:
        size=TILE["size"],
        mpp=lambda wc: opt("--mpp", TILE["target_mpp"]),
        stride=lambda wc: opt("--stride", TILE["stride"]),
        threshold=TILE["background_threshold"],
        max_background=TILE["max_background"],
        edge=TILE["edge"],
        fallback=mpp_flag,
        regions=lambda wc, input: (
            f"--regions-from {shlex.quote(input.annotations[0])}"
            if input.annotations
            else ""
        ),
    shell:
        "python -m histosynth tile {input.slide:q} {output:q} --name {wildcards.slide:q}"
        " --size {params.size} {params.mpp} {params.stride}"
        " --background-threshold {params.threshold} --max-background {params.max_background}"
        " --edge {params.edge} {params.fallback} {params.regions} --threads {threads}"
        " > {log:q} 2>&1"


rule tiles:
    input:
        expand(f"{RESULTS}/tiles/{{slide}}", slide=SLIDE_NAMES),
