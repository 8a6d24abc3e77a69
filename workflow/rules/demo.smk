# Demo slides: the project's own synthetic H&E slides with nucleus GeoJSON.


rule demo_slides:
    output:
        table=f"{RESULTS}/demo/slides.csv",
        images=expand(f"{RESULTS}/demo/{{slide}}.tif", slide=DEMO_NAMES),
        annotations=expand(f"{RESULTS}/demo/{{slide}}.geojson", slide=DEMO_NAMES),
        regions=expand(f"{RESULTS}/demo/{{slide}}.regions.geojson", slide=DEMO_NAMES),
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
        flags=flags("demo-slides"),
    shell:
        "python -m histosynth demo-slides {params.out:q} {params.flags} > {log:q} 2>&1"
