# Synthetic nuclei masks: statistics and shapes fitted on the TRAIN slides, sampled in shards.


rule fit_stats:
    input:
        train_patches,
    output:
        stats=f"{RESULTS}/{{fit}}stats/stats.json",
        counts=report(
            f"{RESULTS}/{{fit}}stats/counts.png",
            caption="../report/stats_counts.rst",
            category="2. Mask statistics",
        ),
        morphology=report(
            f"{RESULTS}/{{fit}}stats/morphology.png",
            caption="../report/stats_morphology.rst",
            category="2. Mask statistics",
        ),
        spatial=report(
            f"{RESULTS}/{{fit}}stats/spatial.png",
            caption="../report/stats_spatial.rst",
            category="2. Mask statistics",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}fit_stats.log",
    conda:
        CPU_ENV
    threads: STATS["threads"]
    resources:
        mem_mb=STATS["mem_mb"],
        runtime=STATS["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        flags=fit_flags("fit-stats"),
    shell:
        "python -m histosynth fit-stats {input:q} {params.out:q} {params.flags} > {log:q} 2>&1"


rule nuclei_library:
    input:
        train_patches,
    output:
        npz=f"{RESULTS}/{{fit}}library/nuclei.npz",
        montage=report(
            f"{RESULTS}/{{fit}}library/montage.png",
            caption="../report/library_montage.rst",
            category="3. Nucleus shapes",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}nuclei_library.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=LIBRARY["mem_mb"],
        runtime=LIBRARY["runtime"],
    params:
        flags=fit_flags("nuclei-library"),
    shell:
        "python -m histosynth nuclei-library {input:q} {output.npz:q} --montage {output.montage:q}"
        " {params.flags} > {log:q} 2>&1"


rule train_dvae:
    input:
        f"{RESULTS}/{{fit}}library/nuclei.npz",
    output:
        model=f"{RESULTS}/{{fit}}models/dvae/dvae.pt",
        log_csv=f"{RESULTS}/{{fit}}models/dvae/log.csv",
        traversal=report(
            f"{RESULTS}/{{fit}}models/dvae/traversal.png",
            caption="../report/dvae_traversal.rst",
            category="3. Nucleus shapes",
        ),
        samples=report(
            f"{RESULTS}/{{fit}}models/dvae/samples.png",
            caption="../report/dvae_samples.rst",
            category="3. Nucleus shapes",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}train_dvae.log",
    conda:
        GPU_ENV
    threads: DVAE["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: DVAE["mem_mb"] * attempt,
        runtime=DVAE["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        flags=fit_flags("train-dvae", "--threads"),
    shell:
        "python -m histosynth train-dvae {input:q} {params.out:q} {params.flags} --threads {threads}"
        " > {log:q} 2>&1"


rule dvae_sweep:
    input:
        f"{RESULTS}/library/nuclei.npz",
    output:
        table=f"{RESULTS}/models/dvae-sweep/sweep.csv",
        plot=f"{RESULTS}/models/dvae-sweep/sweep.png",
    log:
        f"{RESULTS}/logs/dvae_sweep.log",
    conda:
        GPU_ENV
    threads: DVAE["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: DVAE["mem_mb"] * attempt,
        runtime=DVAE["runtime"] * len(DVAE["sweep_latent_dims"]),
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        flags=flags("dvae-sweep", "--threads"),
    shell:
        "python -m histosynth dvae-sweep {input:q} {params.out:q} {params.flags} --threads {threads}"
        " > {log:q} 2>&1"


DAFF = config["daff"]


def sample_masks_inputs(wildcards):
    """stats.json + dvae.pt; with sample_masks.method daff the centroid library + G1 in their place."""
    if SAMPLE["method"] == "daff":
        return {
            "stats": f"{RESULTS}/{wildcards.fit}models/daff/library.npz",
            "dvae": f"{RESULTS}/{wildcards.fit}models/daff/g1/g1.pt",
        }
    inputs = {
        "stats": f"{RESULTS}/{wildcards.fit}stats/stats.json",
        "dvae": f"{RESULTS}/{wildcards.fit}models/dvae/dvae.pt",
    }
    # nuclei only inside the regime's own generated tissue (DEPAS)
    if config["tissue"]["enabled"]:
        inputs["tissue"] = f"{RESULTS}/{wildcards.fit}models/tissue/tissue.pt"
    return inputs


def tissue_flag(wildcards, input):
    """--tissue MODEL where the tissue layouts are on (tissue.enabled), else nothing."""
    return f"--tissue {shlex.quote(input.tissue)}" if "tissue" in input.keys() else ""


# sample_masks.method daff (seed 003, DAFF-GAN): only in the DAG when sample_masks asks for them
rule daff_library:
    input:
        train_patches,
    output:
        f"{RESULTS}/{{fit}}models/daff/library.npz",
    log:
        f"{RESULTS}/logs/{{fit}}daff_library.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=LIBRARY["mem_mb"],
        runtime=LIBRARY["runtime"],
    params:
        flags=fit_flags("daff-library"),
    shell:
        "python -m histosynth daff-library {input:q} {output:q} {params.flags} > {log:q} 2>&1"


rule train_daff_g1:
    input:
        train_patches,
    output:
        model=f"{RESULTS}/{{fit}}models/daff/g1/g1.pt",
        log_csv=f"{RESULTS}/{{fit}}models/daff/g1/log.csv",
        samples=f"{RESULTS}/{{fit}}models/daff/g1/samples.png",
    log:
        f"{RESULTS}/logs/{{fit}}train_daff_g1.log",
    conda:
        GPU_ENV
    threads: DAFF["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: DAFF["mem_mb"] * attempt,
        runtime=DAFF["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        flags=fit_flags("train-daff-g1", "--threads"),
    shell:
        "python -m histosynth train-daff-g1 {input:q} {params.out:q} {params.flags} --threads {threads}"
        " > {log:q} 2>&1"


rule sample_masks:
    input:
        unpack(sample_masks_inputs),
    output:
        directory(f"{RESULTS}/{{fit}}synthetic/masks/shard-{{shard}}"),
    log:
        f"{RESULTS}/logs/{{fit}}sample_masks/shard-{{shard}}.log",
    conda:
        CPU_ENV
    threads: SAMPLE["threads"]
    resources:
        mem_mb=SAMPLE["mem_mb"],
        runtime=SAMPLE["runtime"],
    params:
        flags=fit_flags("sample-masks", "--threads"),
        tissue=tissue_flag,
    shell:
        "python -m histosynth sample-masks {input.stats:q} {input.dvae:q} {output:q} {params.flags}"
        " {params.tissue} --shard {wildcards.shard} --threads {threads} > {log:q} 2>&1"


rule evaluate_masks:
    input:
        synthetic=expand(
            f"{RESULTS}/{{fit}}synthetic/masks/shard-{{shard}}",
            shard=SHARDS,
            allow_missing=True,
        ),
        real=test_patches,
    output:
        evaluation=f"{RESULTS}/{{fit}}synthetic/masks-evaluation/evaluation.json",
        histograms=report(
            f"{RESULTS}/{{fit}}synthetic/masks-evaluation/histograms.png",
            caption="../report/masks_histograms.rst",
            category="4. Synthetic masks",
        ),
        montage=report(
            f"{RESULTS}/{{fit}}synthetic/masks-evaluation/montage.png",
            caption="../report/masks_montage.rst",
            category="4. Synthetic masks",
        ),
        realism=report(
            f"{RESULTS}/{{fit}}synthetic/masks-evaluation/realism.png",
            caption="../report/masks_realism.rst",
            category="4. Synthetic masks",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}evaluate_masks.log",
    conda:
        CPU_ENV
    threads: EVAL_MASKS["threads"]
    resources:
        mem_mb=EVAL_MASKS["mem_mb"],
        runtime=EVAL_MASKS["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        flags=fit_flags("evaluate-masks", "--threads"),
    shell:
        "python -m histosynth evaluate-masks {input.synthetic:q} {params.out:q} --real {input.real:q}"
        " {params.flags} --threads {threads} > {log:q} 2>&1"


TISSUE = config["tissue"]
#: the tissue-layout outputs (seed 002, DEPAS): only with tissue.enabled, so the default DAG is unchanged
TISSUE_OUTPUTS = (
    [f"{RESULTS}/models/tissue/tissue.pt", f"{RESULTS}/synthetic/tissue"]
    if TISSUE["enabled"]
    else []
)

if TISSUE["enabled"]:

    # per regime, like every fitted stage: the regime's own train slides; their tiles (grey > 204 = air), or,
    # with rasterize.tissue_regions, their rasterized patch sets, whose tissue.npy holds the region labels
    # (source patches: their imported patch sets, IMAGE_SETS)
    TISSUE_SOURCE = "patches" if config["rasterize"]["tissue_regions"] else IMAGE_SETS

    rule train_tissue:
        input:
            lambda wc: expand(
                f"{RESULTS}/{TISSUE_SOURCE}/{{slide}}", slide=fit_slides(wc.fit)
            ),
        output:
            model=f"{RESULTS}/{{fit}}models/tissue/tissue.pt",
            log_csv=f"{RESULTS}/{{fit}}models/tissue/log.csv",
            samples=f"{RESULTS}/{{fit}}models/tissue/samples.png",
        log:
            f"{RESULTS}/logs/{{fit}}train_tissue.log",
        conda:
            GPU_ENV
        threads: TISSUE["threads"]
        resources:
            gpu=GPU,
            mem_mb=lambda wc, attempt: TISSUE["mem_mb"] * attempt,
            runtime=TISSUE["runtime"],
        params:
            out=lambda w, output: os.path.dirname(output[0]),
            flags=fit_flags("train-tissue", "--threads"),
        shell:
            "python -m histosynth train-tissue {input:q} {params.out:q} {params.flags} --threads {threads}"
            " > {log:q} 2>&1"

    rule sample_tissue:
        input:
            f"{RESULTS}/models/tissue/tissue.pt",
        output:
            directory(f"{RESULTS}/synthetic/tissue"),
        log:
            f"{RESULTS}/logs/sample_tissue.log",
        conda:
            CPU_ENV
        threads: TISSUE["threads"]
        resources:
            mem_mb=TISSUE["mem_mb"],
            runtime=TISSUE["runtime"],
        params:
            flags=flags("sample-tissue", "--threads"),
        shell:
            "python -m histosynth sample-tissue {input:q} {output:q} {params.flags} --threads {threads}"
            " > {log:q} 2>&1"


rule masks:
    input:
        TISSUE_OUTPUTS,
        expand(f"{RESULTS}/synthetic/masks/shard-{{shard}}", shard=SHARDS),
        fitted_all(rules.evaluate_masks.output),
        fitted_all(rules.train_dvae.output),
        fitted_all(rules.fit_stats.output),
        fitted_all(rules.nuclei_library.output),
