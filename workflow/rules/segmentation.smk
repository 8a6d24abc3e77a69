# Downstream proof: HoVer-Net per arm and seed, scored on the TEST slides, gathered into one report; and
# the learning curve (rule evidence): the same per (k, seed) regime, gathered into the evidence report.


wildcard_constraints:
    arm="|".join(map(re.escape, ARMS + EVIDENCE_ARMS + ["real"])),  # real: the gate's segmenter
    seed=r"\d+",


rule train_segmenter:
    input:
        real=train_patches,
        synthetic=arm_synthetic,
    output:
        model=f"{SEG_DIR}/model.pt",
        log_csv=f"{SEG_DIR}/log.csv",
        validation=f"{SEG_DIR}/validation.csv",
        train=f"{SEG_DIR}/train.json",
    log:
        f"{RESULTS}/logs/{{fit}}train_segmenter/{{arm}}/seed-{{seed}}.log",
    conda:
        GPU_ENV
    threads: SEG["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: SEG["mem_mb"] * attempt,
        runtime=SEG["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        real=lambda wc: quoted(train_patches(wc)),
        synthetic=lambda wc: (
            f"--synthetic {quoted(arm_synthetic(wc))}" if arm_synthetic(wc) else ""
        ),
        flags=flags("train-segmenter", "--seed", "--threads"),
    shell:
        "python -m histosynth train-segmenter {params.real} {params.out:q} --arm {wildcards.arm:q}"
        " --seed {wildcards.seed} {params.synthetic} {params.flags} --threads {threads} > {log:q} 2>&1"


# The quality gate (gate.enabled): a painted pair is kept when the real arm's segmenter finds its nuclei.
rule gate_pairs:
    input:
        model=gate_model,
        pairs=f"{RESULTS}/{{fit}}synthetic/pairs/shard-{{shard}}",
    output:
        pairs=directory(f"{RESULTS}/{{fit}}synthetic/gated/shard-{{shard}}"),
    log:
        f"{RESULTS}/logs/{{fit}}gate_pairs/shard-{{shard}}.log",
    conda:
        CPU_ENV
    threads: GATE["threads"]
    resources:
        mem_mb=GATE["mem_mb"],
        runtime=GATE["runtime"],
    params:
        flags=flags("gate-pairs", "--threads"),
    shell:
        "python -m histosynth gate-pairs {input.model:q} {input.pairs:q} {output.pairs:q} {params.flags}"
        " --threads {threads} > {log:q} 2>&1"


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
        f"{RESULTS}/logs/{{fit}}score/{{arm}}/seed-{{seed}}.log",
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
        scores=expand(fitted(f"{SEG_DIR}/scores.csv"), arm=ARMS, seed=SEEDS),
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
        expand(fitted(f"{SEG_DIR}/scores.csv"), arm=ARMS, seed=SEEDS),


# The learning curve: every arm of every (k, seed) regime, scored on the same TEST slides.
rule evidence_report:
    input:
        scores=lambda wc: [f"{run}/scores.csv" for _, run in evidence_runs()],
        train=lambda wc: [f"{run}/train.json" for _, run in evidence_runs()],
        generators=lambda wc: [path for _, _, path in generator_logs()],
        evaluations=lambda wc: [path for *_, path in generator_evaluations()],
    output:
        markdown=f"{RESULTS}/evidence/report/evidence.md",
        curve=report(
            f"{RESULTS}/evidence/report/learning_curve.png",
            caption="../report/learning_curve.rst",
            category="8. Evidence",
        ),
        validation=report(
            f"{RESULTS}/evidence/report/validation.png",
            caption="../report/validation_curves.rst",
            category="8. Evidence",
        ),
        differences=f"{RESULTS}/evidence/report/differences.csv",
    log:
        f"{RESULTS}/logs/evidence_report.log",
    conda:
        CPU_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        runs=lambda wc: quoted(f"{k}={run}" for k, run in evidence_runs()),
        generators=lambda wc: quoted(
            f"--generator-log={k}:{s}={p}" for k, s, p in generator_logs()
        ),
        evaluations=lambda wc: quoted(
            f"--{kind}-evaluation={k}:{s}={p}"
            for k, s, kind, p in generator_evaluations()
        ),
        flags=flags("evidence-report"),
    shell:
        "python -m histosynth evidence-report {params.runs} {params.out:q} {params.generators}"
        " {params.evaluations} {params.flags} > {log:q} 2>&1"


rule evidence:
    input:
        rules.evidence_report.output,


# Whole-slide segmentation with a trained segmenter: `snakemake segment` (segment.slides, segment.arm / seed).
rule segment_slide:
    input:
        model=f"{RESULTS}/segmentation/{SEGMENT['arm']}/seed-{SEGMENT_SEED}/model.pt",
        slide=lambda wc: SEGMENT_SLIDES[wc.name],
    output:
        directory(f"{RESULTS}/segment/{{name}}"),
    log:
        f"{RESULTS}/logs/segment/{{name}}.log",
    wildcard_constraints:
        name="|".join(map(re.escape, SEGMENT_SLIDES)) or "(?!)",
    conda:
        GPU_ENV
    threads: SEGMENT["threads"]
    resources:
        gpu=GPU,
        mem_mb=SEGMENT["mem_mb"],
        runtime=SEGMENT["runtime"],
    params:
        flags=flags("segment", "--threads"),
    shell:
        "python -m histosynth segment {input.model:q} {input.slide:q} {output:q} {params.flags}"
        " --threads {threads} > {log:q} 2>&1"


rule segment:
    input:
        expand(f"{RESULTS}/segment/{{name}}", name=list(SEGMENT_SLIDES)),
