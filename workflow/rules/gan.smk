# Mask -> H&E translation: a conditional GAN trained on the TRAIN slides' real pairs paints the synthetic masks.


# gan.option_by cluster: the stain styles of the regime's train slides (k-means), the test slides assigned
rule stain_styles:
    input:
        train=train_patches,
        test=test_patches,
    output:
        f"{RESULTS}/{{fit}}stain/styles.json",
    log:
        f"{RESULTS}/logs/{{fit}}stain_styles.log",
    conda:
        CPU_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        flags=fit_flags("stain-styles"),
    shell:
        "python -m histosynth stain-styles {input.train:q} {output:q} --assign {input.test:q} {params.flags}"
        " > {log:q} 2>&1"


rule train_gan:
    input:
        patches=train_patches,
        styles=styles_json,
    output:
        model=f"{RESULTS}/{{fit}}models/gan/gan.pt",
        log_csv=f"{RESULTS}/{{fit}}models/gan/log.csv",
        samples=report(
            f"{RESULTS}/{{fit}}models/gan/samples.png",
            caption="../report/gan_samples.rst",
            category="5. Synthetic images",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}train_gan.log",
    conda:
        GPU_ENV
    threads: GAN["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wc, attempt: GAN["mem_mb"] * attempt,
        runtime=GAN["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        options=train_options_flags,
        flags=fit_flags("train-gan", "--threads"),
    shell:
        "python -m histosynth train-gan {input.patches:q} {params.out:q} {params.options}"
        " {params.flags} --threads {threads} > {log:q} 2>&1"


# gan.tissue_channel: the GAN reads each shard's tissue.npy (sample_masks --tissue; the config requires
# tissue.enabled); the real patches of translate_test_masks / translate_train_masks give it from their images
rule translate:
    input:
        gan=f"{RESULTS}/{{fit}}models/gan/gan.pt",
        masks=f"{RESULTS}/{{fit}}synthetic/masks/shard-{{shard}}",
    output:
        pairs=directory(f"{RESULTS}/{{fit}}synthetic/pairs/shard-{{shard}}"),
        montage=report(
            f"{RESULTS}/{{fit}}synthetic/pairs/shard-{{shard}}.montage.png",
            caption="../report/pairs_montage.rst",
            category="5. Synthetic images",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}translate/shard-{{shard}}.log",
    conda:
        GPU_ENV
    threads: TRANSLATE["threads"]
    resources:
        gpu=GPU,
        mem_mb=TRANSLATE["mem_mb"],
        runtime=TRANSLATE["runtime"],
    params:
        flags=fit_flags("translate", "--seed", "--threads"),
        seed=shard_seed,
    shell:
        "python -m histosynth translate {input.gan:q} {input.masks:q} {output.pairs:q} {params.flags}"
        " --seed {params.seed} --montage {output.montage:q} --threads {threads} > {log:q} 2>&1"


rule translate_test_masks:
    input:
        gan=f"{RESULTS}/{{fit}}models/gan/gan.pt",
        masks=f"{RESULTS}/patches/{{slide}}",
        styles=styles_json,
    output:
        pairs=directory(f"{RESULTS}/{{fit}}synthetic/translated-test/{{slide}}"),
    log:
        f"{RESULTS}/logs/{{fit}}translate_test_masks/{{slide}}.log",
    conda:
        GPU_ENV
    threads: TRANSLATE["threads"]
    resources:
        gpu=GPU,
        mem_mb=TRANSLATE["mem_mb"],
        runtime=TRANSLATE["runtime"],
    params:
        option=paint_option_flags,
        flags=fit_flags("translate", "--option", "--threads"),
    shell:
        "python -m histosynth translate {input.gan:q} {input.masks:q} {output.pairs:q} {params.option}"
        " {params.flags} --no-montage --threads {threads} > {log:q} 2>&1"


# painted-real: the GAN paints the masks of the slides it was trained on (image realism apart from mask realism)
rule translate_train_masks:
    input:
        gan=f"{RESULTS}/{{fit}}models/gan/gan.pt",
        masks=f"{RESULTS}/patches/{{slide}}",
        styles=styles_json,
    output:
        pairs=directory(f"{RESULTS}/{{fit}}synthetic/painted-train/{{slide}}"),
    log:
        f"{RESULTS}/logs/{{fit}}translate_train_masks/{{slide}}.log",
    conda:
        GPU_ENV
    threads: TRANSLATE["threads"]
    resources:
        gpu=GPU,
        mem_mb=TRANSLATE["mem_mb"],
        runtime=TRANSLATE["runtime"],
    params:
        option=paint_option_flags,
        flags=fit_flags("translate", "--option", "--threads"),
    shell:
        "python -m histosynth translate {input.gan:q} {input.masks:q} {output.pairs:q} {params.option}"
        " {params.flags} --no-montage --threads {threads} > {log:q} 2>&1"


rule evaluate_images:
    input:
        generated=expand(
            f"{RESULTS}/{{fit}}synthetic/pairs/shard-{{shard}}",
            shard=SHARDS,
            allow_missing=True,
        ),
        real=test_patches,
        floor=all_train_patches,
        translated=expand(
            f"{RESULTS}/{{fit}}synthetic/translated-test/{{slide}}",
            slide=TEST_SLIDES,
            allow_missing=True,
        ),
        styles=styles_json,
    output:
        evaluation=f"{RESULTS}/{{fit}}synthetic/images-evaluation/evaluation.json",
        figure=report(
            f"{RESULTS}/{{fit}}synthetic/images-evaluation/figure.png",
            caption="../report/images_evaluation.rst",
            category="5. Synthetic images",
        ),
    log:
        f"{RESULTS}/logs/{{fit}}evaluate_images.log",
    conda:
        CPU_ENV
    threads: EVAL_IMAGES["threads"]
    resources:
        mem_mb=EVAL_IMAGES["mem_mb"],
        runtime=EVAL_IMAGES["runtime"],
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        options=real_options_flags,
        flags=fit_flags("evaluate-images", "--threads"),
    shell:
        "python -m histosynth evaluate-images {input.generated:q} {params.out:q} --real {input.real:q}"
        " --real-masks-translated {input.translated:q} --fid-floor {input.floor:q} {params.options}"
        " {params.flags} --threads {threads} > {log:q} 2>&1"


rule synthetic:
    input:
        expand(f"{RESULTS}/synthetic/pairs/shard-{{shard}}", shard=SHARDS),
        fitted_all(rules.evaluate_images.output),
        fitted_all(rules.train_gan.output),
