# Annotations -> typed patch sets (one job per annotated slide), and the train/test split.
ANNOTATED = annotated_slides()
SPLIT = config["split"]


def class_flags():
    classes = config["classes"]
    flags = ""
    if classes:
        pairs = " ".join(shlex.quote(f"{k}={v}") for k, v in classes.items())
        flags += f"--classes {pairs}"
    if config["catch_all"] is not None:
        flags += f" --catch-all {shlex.quote(str(config['catch_all']))}"
    return flags


def split_flags():
    flags = f"--test-fraction {SPLIT['test_fraction']} --seed {SPLIT['seed']}"
    if SPLIT["train"] is not None or SPLIT["test"] is not None:
        flags += " --train " + " ".join(map(shlex.quote, SPLIT["train"] or []))
        flags += " --test " + " ".join(map(shlex.quote, SPLIT["test"] or []))
    groups = [
        f"{s}={g}" for s, g in zip(SLIDES["slide"], SLIDES["stain"]) if g is not None
    ]
    if SPLIT["by_stain"] and groups:
        flags += " --groups " + " ".join(map(shlex.quote, groups))
    return flags


rule rasterize:
    input:
        annotations=lambda wc: slide_annotations(wc.slide),
        tiles=f"{RESULTS}/tiles/{{slide}}",
    output:
        patches=directory(f"{RESULTS}/patches/{{slide}}"),
        overlay=f"{RESULTS}/qc/overlays/{{slide}}.png",
    log:
        f"{RESULTS}/logs/rasterize/{{slide}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        classes=class_flags(),
    shell:
        "histosynth rasterize {input.annotations:q} {input.tiles:q} {output.patches:q}"
        " {params.classes} --overlay {output.overlay:q} > {log:q} 2>&1"


rule split:
    output:
        f"{RESULTS}/split.csv",
    log:
        f"{RESULTS}/logs/split.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        slides=" ".join(map(shlex.quote, ANNOTATED)),
        flags=split_flags(),
    shell:
        "histosynth split {output:q} --slides {params.slides} {params.flags} > {log:q} 2>&1"


rule patches:
    input:
        expand(f"{RESULTS}/patches/{{slide}}", slide=ANNOTATED),
        expand(f"{RESULTS}/qc/overlays/{{slide}}.png", slide=ANNOTATED),
        f"{RESULTS}/split.csv",
