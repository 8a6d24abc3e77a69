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
        flags=flags("tile", "--threads", "--mpp-fallback"),
        fallback=mpp_flag,
        regions=lambda wc, input: (
            f"--regions-from {shlex.quote(input.annotations[0])}"
            if input.annotations
            else ""
        ),
    shell:
        "python -m histosynth tile {input.slide:q} {output:q} --name {wildcards.slide:q}"
        " {params.flags} {params.fallback} {params.regions} --threads {threads} > {log:q} 2>&1"


# source patches has no slides to tile: its image sets are the imported patch sets (rule import_patches)
rule tiles:
    input:
        expand(f"{RESULTS}/{IMAGE_SETS}/{{slide}}", slide=SLIDE_NAMES),
