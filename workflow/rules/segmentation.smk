# Downstream proof: HoVer-Net per arm and seed, scored on the TEST slides, gathered into one report.


wildcard_constraints:
    arm="|".join(map(re.escape, ARMS)),
    seed=r"\d+",


rule train_segmenter:
    input:
        real=arm_real,
        synthetic=arm_synthetic,
    output:
        model=f"{SEG_DIR}/model.pt",
        log_csv=f"{SEG_DIR}/log.csv",
    log:
        f"{RESULTS}/logs/train_segmenter/{{arm}}/seed-{{seed}}.log",
    conda:
        GPU_ENV
    threads: SEG["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: SEG["mem_mb"] * attempt,
        runtime=SEG["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        real=lambda wc: quoted(arm_real(wc)),
        synthetic=lambda wc: (
            f"--synthetic {quoted(arm_synthetic(wc))}" if arm_synthetic(wc) else ""
        ),
        flags=flags("train-segmenter", "--seed", "--threads"),
    shell:
        "python -m histosynth train-segmenter {params.real} {params.out:q} --arm {wildcards.arm:q}"
        " --seed {wildcards.seed} {params.synthetic} {params.flags} --threads {threads} > {log:q} 2>&1"


# The only rule that reads the TEST slides' patch sets for segmentation.
rule score:
    input:
        model=f"{SEG_DIR}/model.pt",
        test=test_patches,
    output:
        scores=f"{SEG_DIR}/scores.csv",
        summary=f"{SEG_DIR}/summary.json",
        overlay=report(
            f"{SEG_DIR}/overlay.png",
            caption="../report/overlay.rst",
            category="6. Segmentation",
            subcategory="{arm}",
            labels={"arm": "{arm}", "seed": "{seed}", "figure": "test overlays"},
        ),
    log:
        f"{RESULTS}/logs/score/{{arm}}/seed-{{seed}}.log",
    conda:
        CPU_ENV
    threads: SCORE["threads"]
    resources:
        mem_mb=SCORE["mem_mb"],
        runtime=SCORE["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        flags=flags("score", "--threads"),
    shell:
        "python -m histosynth score {input.model:q} {input.test:q} {params.out:q} {params.flags}"
        " --threads {threads} > {log:q} 2>&1"


rule report:
    input:
        scores=expand(f"{SEG_DIR}/scores.csv", arm=ARMS, seed=SEEDS),
        figures=[path for _, path in report_figures()],
    output:
        html=f"{RESULTS}/report/index.html",
        summary=f"{RESULTS}/report/summary.csv",
        comparison=report(
            f"{RESULTS}/report/comparison.png",
            caption="../report/comparison.rst",
            category="7. Report",
        ),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        figures=quoted(f"--figure={c}={p}" for c, p in report_figures()),
    shell:
        "python -m histosynth report {input.scores:q} {params.out:q} {params.figures} > {log:q} 2>&1"


rule segmentation:
    input:
        expand(f"{SEG_DIR}/scores.csv", arm=ARMS, seed=SEEDS),
