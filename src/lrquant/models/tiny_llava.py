"""``tiny-llava``: a real vision-language model made here from real parts, to measure on.

No vision-language weights can be downloaded, so the built-in one is a LLaVA joined from two real
models lrquant already ships: the DINOv2-small tower (``dinov2-small``) reads the image, a
two-layer projector turns its patch features into token embeddings, and SmolLM2-135M
(``smollm2-135m``) reads them in place of the image's tokens. Only the projector is new. It
starts from a ridge probe (each patch's features to the image's digit, mapped to the embeddings
of the ten digit words) and is then trained, deterministically, on ``digits-words:train`` (a
handwritten digit and the text "A handwritten digit seven.") on the loss of the digit word, with
the tower and the language model frozen; its accuracy on the disjoint ``digits-words:test`` (the
likeliest of the ten digit words) is written beside it.

The images are read at 56 x 56 pixels: 4 x 4 patches of 14, so 16 image tokens (the 8 x 8
digits hold no more detail), which keeps the training to minutes on a CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lrquant.console import Progress, log
from lrquant.data.pairs import digit_pairs
from lrquant.errors import LrquantError
from lrquant.modalities.image_text import ANSWERS, SCORED, encode, score_pairs

IMAGE_SIDE = 56  # pixels: DINOv2's 14-pixel patches, 4 x 4 of them
IMAGE_MARKER = "<image>"
STEPS = 200
BATCH = 16
LR = 3e-3
SEED = 0
RIDGE = 1e-3  # the probe's ridge, relative to the mean diagonal of the features' Gram matrix
PROBE_SCALE = 4.0  # the probe's outputs are scaled by this before GELU, the words' embeddings divided
SEQLEN = 64  # tokens: the image's 16 and the text's few fit
INFO_FILE = "tiny_llava.json"  # how the projector was trained, and the accuracy it reached


def compose_llava(
    text_dir: Path,
    vision_dir: Path,
    out: Path,
    steps: int = STEPS,
    seed: int = SEED,
    bf16: bool | None = None,
) -> dict:
    """Join the causal LM in ``text_dir`` and the DINOv2 backbone in ``vision_dir`` into a LLaVA,
    train its projector on ``digits-words:train`` for ``steps`` steps of :data:`BATCH` pairs, and
    save model and processor in ``out``. Returns what :data:`INFO_FILE` holds: the recipe, the
    digit word's loss at the start and end of training, the test accuracy and the seconds taken.
    ``bf16``: train under bf16 autocast (None: where this CPU or GPU runs it fast)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitImageProcessorPil,
        Dinov2Model,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from lrquant.recipes import fast_bf16

    start = time.perf_counter()
    text = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    vision = Dinov2Model.from_pretrained(vision_dir, dtype=torch.float32)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    text_config = text.config.to_dict() | {"vocab_size": len(tokenizer)}
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config,
        image_token_id=image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # the class token dropped, the patches kept
        image_seq_length=(IMAGE_SIDE // vision.config.patch_size) ** 2,
        tie_word_embeddings=text.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    text.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the marker's embedding: the mean (it is replaced by the image anyway)
        embeddings = text.get_input_embeddings().weight
        embeddings[image_id] = embeddings[:image_id].mean(0)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(vision.state_dict())
    processor = LlavaProcessor(
        image_processor=_image_processor(BitImageProcessorPil, vision_dir),
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_MARKER,
    )
    use_bf16 = fast_bf16("cpu") if bf16 is None else bf16
    losses = _train_projector(model, processor, steps, seed, use_bf16)
    accuracy = digits_accuracy(model, processor)
    info = {
        "parts": {"language": str(text_dir), "vision": str(vision_dir)},
        "projector": {"data": "digits-words:train", "steps": steps, "batch": BATCH, "lr": LR, "seed": seed,
                      "bf16": use_bf16, "image_side": IMAGE_SIDE},
        "word_loss": {"first_steps": losses[0], "last_steps": losses[1]},
        "accuracy": {"data": "digits-words:test", "fp": accuracy},
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (Path(out) / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(f"tiny-llava: digits-words:test accuracy {100 * accuracy:.1f} % in full precision")
    return info


def _image_processor(cls, vision_dir: Path):
    """The tower's own image processing (normalisation), resized to :data:`IMAGE_SIDE`; ``cls``
    its processor class (PIL-based: torchvision is not needed)."""
    file = Path(vision_dir) / "preprocessor_config.json"
    settings = json.loads(file.read_text()) if file.is_file() else {}
    keep = (
        "do_convert_rgb",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
    )
    return cls(
        **{key: settings[key] for key in keep if key in settings},
        do_resize=True,
        size={"height": IMAGE_SIDE, "width": IMAGE_SIDE},
        do_center_crop=False,
    )


def _train_projector(model, processor, steps: int, seed: int, bf16: bool) -> tuple[float, float]:
    """Train the projector alone on the digit word's token; returns its mean loss over the first
    and the last tenth of the steps."""
    samples = encode(processor, model.config.image_token_id, digit_pairs("train"), SEQLEN)
    if ANSWERS[0] not in samples.fields:
        raise LrquantError("the language model's tokenizer must hold each digit word as one token")
    ids, pixels, text = samples["input_ids"], samples["pixel_values"], samples[SCORED]
    for param in model.parameters():
        param.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for param in projector.parameters():
        param.requires_grad_(True)
    with torch.no_grad():  # the frozen tower's patch features, once
        features = torch.cat([_patch_features(model, pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
        _probe_start(model, features, samples)
    embed = model.get_input_embeddings()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    # the digit word's token is learned (the rest of the caption is the same for every image)
    word = torch.zeros_like(text)
    word[torch.arange(len(ids)), samples["answer_at"]] = True
    targets = ids[:, 1:].masked_fill(~word[:, 1:], -100)
    losses = []
    with Progress(steps, "projector", "steps") as bar:
        for _ in range(steps):
            batch = torch.randint(0, len(ids), (BATCH,), generator=generator)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                tokens = embed(ids[batch]).masked_scatter(
                    (ids[batch] == image_id)[..., None], projector(features[batch]).to(embed.weight.dtype)
                )
                hidden = model.model.language_model(inputs_embeds=tokens).last_hidden_state
            logits = model.lm_head(hidden[:, :-1].float())
            loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
    for param in projector.parameters():
        param.requires_grad_(False)
    tenth = max(1, steps // 10)
    return round(sum(losses[:tenth]) / tenth, 4), round(sum(losses[-tenth:]) / tenth, 4)


def _probe_start(model, features: torch.Tensor, samples) -> None:
    """Start the projector where it already names the digit: its first layer holds a ridge
    regression of each patch's features on the image's class (one output per digit, scaled so
    GELU passes the likely ones and stops the others), its second maps those outputs to the
    embeddings of the ten digit words; every other weight starts at zero."""
    projector = model.model.multi_modal_projector
    answer, choices = samples["answer"], samples["choices"][0]
    n, patches, width = features.shape
    x = torch.cat([features.reshape(-1, width), torch.ones(n * patches, 1)], dim=1).double()
    y = F.one_hot(answer, len(choices)).double().repeat_interleave(patches, dim=0)
    gram = x.T @ x
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    probe = torch.linalg.solve(gram + ridge, x.T @ y).T.float()  # [classes, width + 1]
    words = model.get_input_embeddings().weight[choices]  # [classes, hidden]
    for layer in (projector.linear_1, projector.linear_2):
        layer.weight.zero_()
        layer.bias.zero_()
    classes = len(choices)
    projector.linear_1.weight[:classes] = PROBE_SCALE * probe[:, :width]
    projector.linear_1.bias[:classes] = PROBE_SCALE * probe[:, width]
    projector.linear_2.weight[:, :classes] = words.T / PROBE_SCALE


def _patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """What the projector reads: the tower's chosen layer, without the class token."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def digits_accuracy(model, processor, batch: int = 50) -> float:
    """The share of ``digits-words:test`` images whose digit word the model finds likeliest of
    the ten after "A handwritten digit" (the whole model, image to logits)."""
    samples = encode(processor, model.config.image_token_id, digit_pairs("test"), SEQLEN)
    return score_pairs(model, samples, batch, "accuracy")["accuracy"]
