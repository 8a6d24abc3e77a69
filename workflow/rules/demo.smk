# Demo slides: the project's own synthetic H&E slides with nucleus GeoJSON.


rule demo_slides:
    output:
        table=f"{RESULTS}/demo/slides.csv",
        images=expand(f"{RESULTS}/demo/{{slide}}.tif", slide=DEMO_NAMES),
        annotations=expand(f"{RESULTS}/demo/{{slide}}.geojson", slide=DEMO_NAMES),
    log:
        f"{RESULTS}/logs/demo_slides.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        n=DEMO["n_slides"],
        width=DEMO["size"][0],
        height=DEMO["size"][1],
        mpp=DEMO["mpp"],
        seed=DEMO["seed"],
    shell:
        "python -m histosynth demo-slides {params.out:q} --n-slides {params.n}"
        " --size {params.width} {params.height} --mpp {params.mpp} --seed {params.seed}"
        " > {log:q} 2>&1"
