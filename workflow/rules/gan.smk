# Mask -> H&E translation: a conditional GAN trained on the TRAIN slides' real pairs paints the synthetic masks.
GAN = config["gan"]
TRANSLATE = config["translate"]


def slide_option(slide):
    """The option-layer value of a slide: its stain style, its name, or one shared value."""
    if GAN["option_by"] == "slide":
        return slide
    if GAN["option_by"] == "stain":
        stain = slide_row(slide)["stain"]
        return stain if stain is not None else "default"
    return "default"


TRAIN_OPTIONS = sorted({slide_option(s) for s in TRAIN_SLIDES})


def known_option(slide):
    """The slide's option if the GAN was trained on it, else the first one it knows (a style it never saw)."""
    option = slide_option(slide)
    return option if option in TRAIN_OPTIONS or not TRAIN_OPTIONS else TRAIN_OPTIONS[0]


def option_flags(slides):
    return " ".join(shlex.quote(f"{s}={slide_option(s)}") for s in slides)


def gan_flags():
    return (
        f"--crop {GAN['crop']} --depth {GAN['depth']} --width {GAN['width']}"
        f" --disc {GAN['disc']} --num-d {GAN['num_d']} --gan-mode {GAN['gan_mode']}"
        f" --lambda-l1 {GAN['lambda_l1']} --steps {GAN['steps']} --decay-steps {GAN['decay_steps']}"
        f" --batch-size {GAN['batch_size']} --lr {GAN['lr']} --seed {config['seed']}"
        f" --device {config['device']} --sample-every {GAN['sample_every']}"
        f" --checkpoint-every {GAN['checkpoint_every']} --precision {GAN['precision']}"
        + (" --noise" if GAN["noise"] else "")
    )


rule train_gan:
    input:
        train_patches,
    output:
        model=f"{RESULTS}/models/gan/gan.pt",
        log_csv=f"{RESULTS}/models/gan/log.csv",
        samples=f"{RESULTS}/models/gan/samples.png",
    log:
        f"{RESULTS}/logs/train_gan.log",
    threads: GAN["threads"]
    resources:
        gpu=GPU,
        mem_mb=GAN["mem_mb"],
        runtime=GAN["runtime"],
    params:
        out=f"{RESULTS}/models/gan",
        options=option_flags(TRAIN_SLIDES),
        classes=class_flags(),
        flags=gan_flags(),
    shell:
        "histosynth train-gan {input:q} {params.out:q} --options {params.options}"
        " {params.flags} {params.classes} --threads {threads} > {log:q} 2>&1"


rule translate:
    input:
        gan=f"{RESULTS}/models/gan/gan.pt",
        masks=f"{RESULTS}/synthetic/masks/shard-{{shard}}",
    output:
        pairs=directory(f"{RESULTS}/synthetic/pairs/shard-{{shard}}"),
        montage=f"{RESULTS}/synthetic/pairs/shard-{{shard}}.montage.png",
    log:
        f"{RESULTS}/logs/translate/shard-{{shard}}.log",
    threads: TRANSLATE["threads"]
    resources:
        gpu=GPU,
        mem_mb=TRANSLATE["mem_mb"],
        runtime=TRANSLATE["runtime"],
    params:
        options=" ".join(f"--option {shlex.quote(o)}" for o in TRANSLATE["options"]),
        batch=TRANSLATE["batch"],
        # each shard its own stream: the generator's noise and dropout must not repeat across shards
        seed=lambda wc: config["seed"] * 1000 + int(wc.shard),
        device=config["device"],
    shell:
        "histosynth translate {input.gan:q} {input.masks:q} {output.pairs:q} {params.options}"
        " --batch {params.batch} --seed {params.seed} --montage {output.montage:q}"
        " --device {params.device} --threads {threads} > {log:q} 2>&1"


rule translate_test_masks:
    input:
        gan=f"{RESULTS}/models/gan/gan.pt",
        masks=f"{RESULTS}/patches/{{slide}}",
    output:
        pairs=directory(f"{RESULTS}/synthetic/translated-test/{{slide}}"),
    log:
        f"{RESULTS}/logs/translate_test_masks/{{slide}}.log",
    threads: TRANSLATE["threads"]
    resources:
        gpu=GPU,
        mem_mb=TRANSLATE["mem_mb"],
        runtime=TRANSLATE["runtime"],
    params:
        option=lambda wc: shlex.quote(known_option(wc.slide)),
        batch=TRANSLATE["batch"],
        seed=config["seed"],
        device=config["device"],
    shell:
        "histosynth translate {input.gan:q} {input.masks:q} {output.pairs:q} --option {params.option}"
        " --batch {params.batch} --seed {params.seed} --no-montage"
        " --device {params.device} --threads {threads} > {log:q} 2>&1"


rule evaluate_images:
    input:
        generated=expand(f"{RESULTS}/synthetic/pairs/shard-{{shard}}", shard=SHARDS),
        real=test_patches,
        translated=expand(
            f"{RESULTS}/synthetic/translated-test/{{slide}}", slide=TEST_SLIDES
        ),
    output:
        evaluation=f"{RESULTS}/synthetic/images-evaluation/evaluation.json",
        figure=f"{RESULTS}/synthetic/images-evaluation/figure.png",
    log:
        f"{RESULTS}/logs/evaluate_images.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        out=f"{RESULTS}/synthetic/images-evaluation",
        options=option_flags(TEST_SLIDES),
        seed=config["seed"],
    shell:
        "histosynth evaluate-images {input.generated:q} {params.out:q} --real {input.real:q}"
        " --real-masks-translated {input.translated:q} --real-options {params.options}"
        " --seed {params.seed} > {log:q} 2>&1"


rule synthetic:
    input:
        expand(f"{RESULTS}/synthetic/pairs/shard-{{shard}}", shard=SHARDS),
        rules.evaluate_images.output,
        rules.train_gan.output,
