"""Randomly initialised LLaVA checkpoints built entirely offline.

The benchmark and the test-suite need a model with the exact architecture, files and tokenizer layout of a
real LLaVA release, but neither can download one. :func:`build_checkpoint` writes such a checkpoint (random
weights, a tokenizer trained on generated English text, the processor and the chat template) to a folder
that ``optimum-cli export openvino --task image-text-to-text`` converts like a real one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Family = Literal["llava", "llava_next"]

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
# Trained first, so they take ids 0..4 in this order; the configs below rely on these ids.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))

# LLaVA-1.5's conversation format: each user turn is "USER: ", then one "<image>\n" per image of the turn,
# then its text; assistant turns are "ASSISTANT: " and their text; the generation prompt is "ASSISTANT:".
# Plain-string contents are accepted too, because openvino-genai renders messages whose content is a string
# with the image tags already placed in it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] + ' ' -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] + ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# 256 byte tokens, the special tokens, and room for merges so that words are tokens.
_MIN_VOCAB = 512

# CLIP's normalisation constants, as used by every LLaVA release.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a synthetic LLaVA checkpoint: a CLIP vision tower, a two-layer projector and a Llama LM."""

    family: Family = "llava"
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 256
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_hidden % self.vision_heads or self.text_hidden % self.text_heads:
            raise ValueError("hidden sizes must be multiples of their head counts")
        if self.text_heads % self.text_kv_heads:
            raise ValueError("text_heads must be a multiple of text_kv_heads")
        if self.vision_layers < 2:
            # LLaVA reads the vision tower's second-to-last layer.
            raise ValueError("vision_layers must be at least 2")
        if self.vocab_size < _MIN_VOCAB:
            raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} for a byte-level tokenizer")

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image (LLaVA-1.5) or per tile (LLaVA-NeXT), CLS token dropped."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        """LLaVA-NeXT's any-resolution canvases, scaled from LLaVA-v1.6's 336-pixel set to this tile size."""
        s = self.image_size
        return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


TINY = SyntheticSpec(
    image_size=56,
    patch_size=14,
    vision_hidden=128,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate=256,
    text_hidden=128,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=256,
    vocab_size=1024,
    max_position_embeddings=2048,
)

TINY_NEXT = SyntheticSpec(
    family="llava_next",
    image_size=56,
    patch_size=14,
    vision_hidden=128,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate=256,
    text_hidden=128,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=256,
    vocab_size=1024,
    max_position_embeddings=2048,
)

BENCH = SyntheticSpec(
    image_size=336,
    patch_size=14,
    vision_hidden=512,
    vision_layers=8,
    vision_heads=8,
    vision_intermediate=2048,
    text_hidden=1024,
    text_layers=12,
    text_heads=16,
    text_kv_heads=8,
    text_intermediate=2816,
    vocab_size=32000,
    max_position_embeddings=4096,
)


# --- tokenizer corpus -------------------------------------------------------------------------------------

# Word lists, space-separated.
_SUBJECTS = (
    "dog cat bird horse cow sheep child woman man girl boy person chef farmer pilot doctor teacher student "
    "player dancer artist driver cyclist runner family crowd couple baby puppy kitten duck goose rabbit "
    "squirrel fox bear deer lion tiger elephant giraffe zebra monkey fish turtle frog butterfly bee"
)
_OBJECTS = (
    "car bus truck bicycle boat train plane house building tree flower table chair window door bottle cup "
    "plate bowl spoon fork knife book phone computer laptop keyboard screen lamp clock bag umbrella hat shirt "
    "jacket shoe ball kite bench sign road bridge river lake mountain beach field garden street market park "
    "kitchen bedroom office store fence wall roof sky cloud sun moon snow rain grass rock sand wave cake "
    "pizza sandwich apple banana orange carrot bread cheese coffee tea soup salad guitar piano painting map "
    "poster photo picture image letter number word label menu"
)
_ADJECTIVES = (
    "red blue green yellow black white brown gray orange purple pink small large tiny huge old new young "
    "bright dark tall short long round square wooden metal plastic glass soft hard wet dry warm cold busy "
    "quiet empty full clean dirty happy sleepy curious colorful striped spotted shiny broken open closed"
)
_VERBS = (
    "sits stands runs walks jumps flies swims eats drinks reads writes holds carries watches looks plays "
    "rests sleeps waits rides drives climbs crosses leans hangs grows shines falls lies floats smiles"
)
_PREPOSITIONS = "on in under near behind beside above below across along inside outside next to"
_CONNECTIVES = "and while because but so as although when"
_PLACES = (
    "in the morning",
    "at night",
    "during the day",
    "in the rain",
    "under a clear sky",
    "at the center of the image",
    "in the background",
    "in the foreground",
    "on the left",
    "on the right",
    "near the top",
    "near the bottom",
)
_QUESTIONS = (
    "What is in this image?",
    "What color is the {o}?",
    "How many {s}s are there?",
    "Where is the {s}?",
    "What is the {s} doing?",
    "Is there a {o} in the picture?",
    "Describe the scene.",
    "What can you see near the {o}?",
    "Why is the {s} {v2}?",
    "Which {o} is bigger?",
    "What time of day is it?",
    "Can you read the {o}?",
)


def _corpus(seed: int, sentences: int = 6000) -> Iterator[str]:
    """Yield lines of simple generated English about pictures, the register the bot's prompts are in."""
    rng = random.Random(seed)
    subjects, objects = _SUBJECTS.split(), _OBJECTS.split()
    things = subjects + objects
    adjectives, verbs = _ADJECTIVES.split(), _VERBS.split()
    prepositions, connectives = _PREPOSITIONS.split(), _CONNECTIVES.split()

    def phrase() -> str:
        adj = rng.choice(adjectives)
        article = "an" if adj[0] in "aeiou" else "a"
        return f"{article} {adj} {rng.choice(things)}"

    def clause() -> str:
        return (
            f"{phrase()} {rng.choice(verbs)} {rng.choice(prepositions)} the "
            f"{rng.choice(adjectives)} {rng.choice(objects)}"
        )

    for i in range(sentences):
        kind = i % 5
        if kind == 0:
            yield f"The image shows {clause()} {rng.choice(_PLACES)}."
        elif kind == 1:
            yield f"{clause().capitalize()} {rng.choice(connectives)} {clause()}."
        elif kind == 2:
            yield rng.choice(_QUESTIONS).format(
                s=rng.choice(subjects), o=rng.choice(objects), v2=rng.choice(verbs).removesuffix("s") + "ing"
            )
        elif kind == 3:
            yield (
                f"There are {rng.randint(0, 12)} {rng.choice(objects)}s and {rng.randint(1, 99)} "
                f"{rng.choice(subjects)}s, about {rng.randint(1, 2000)} meters away; "
                f"it's {rng.randint(1, 12)}:{rng.randint(0, 59):02d}!"
            )
        else:
            yield f'"{phrase().capitalize()}," the sign says. Yes, it looks {rng.choice(adjectives)} (mostly).'
        if i % 10 == 0:
            # The chat template's role markers should be whole tokens, as in a real tokenizer.
            yield f"USER: Describe {phrase()}. ASSISTANT: It is {phrase()}."


# --- tokenizer --------------------------------------------------------------------------------------------


def _readable(text: str) -> bool:
    return bool(text) and all(c.isprintable() or c == "\n" for c in text) and "\ufffd" not in text


def _build_tokenizer(spec: SyntheticSpec) -> tuple[Any, list[int]]:
    """Train a byte-level BPE tokenizer on the generated corpus and pad its vocabulary to ``spec.vocab_size``.

    Byte-level BPE covers every input byte without an ``<unk>`` fallback, and openvino-tokenizers converts it
    into both a tokenizer and a detokenizer model. Returns the tokenizer and the ids of the tokens that a
    reply should never contain: the special tokens and single bytes that are not readable text on their own.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)

    trained = tok.get_vocab_size()
    texts = tok.decode_batch([[i] for i in range(trained)], skip_special_tokens=False)
    suppressed = [i for i, text in enumerate(texts) if i < len(SPECIAL_TOKENS) or not _readable(text)]

    # A small corpus runs out of merges long before a 32k vocabulary. The embedding matrix, lm_head and the
    # sampling cost must still have the requested size, so the rest of the vocabulary is filled with tokens
    # that encoding never produces (no merge leads to them) but that decode to readable text: each is two
    # trained tokens glued together, so a random model's output still looks like words.
    state = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    by_id = {i: piece for piece, i in vocab.items()}
    banned = set(suppressed)
    pieces = [by_id[i] for i in range(trained) if i not in banned]
    rng = random.Random(spec.seed)
    while len(vocab) < spec.vocab_size:
        candidate = rng.choice(pieces) + rng.choice(pieces)
        if candidate not in vocab:
            vocab[candidate] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(state))

    # Llama prepends <s> to every encoded text; LLaVA's prompts are tokenized with that default.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    if tok.get_vocab_size() != spec.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {spec.vocab_size}")

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=spec.max_position_embeddings,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    return wrapped, suppressed


# --- model, processor -------------------------------------------------------------------------------------


def _model_config(spec: SyntheticSpec) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision: dict[str, Any] = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "projection_dim": spec.vision_hidden,
        "hidden_act": "quick_gelu",
    }
    text: dict[str, Any] = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
    }
    common: dict[str, Any] = {
        "vision_config": CLIPVisionConfig(**vision),
        "text_config": LlamaConfig(**text),
        "image_token_index": IMAGE_ID,
        "image_seq_length": spec.image_seq_length,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "tie_word_embeddings": False,
    }
    if spec.family == "llava":
        return LlavaConfig(**common)
    common["image_grid_pinpoints"] = spec.grid_pinpoints
    return LlavaNextConfig(**common)


def _image_processor(spec: SyntheticSpec) -> Any:
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor

    common: dict[str, Any] = {
        "size": {"shortest_edge": spec.image_size},
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
    }
    if spec.family == "llava":
        return CLIPImageProcessor(**common)
    return LlavaNextImageProcessor(image_grid_pinpoints=spec.grid_pinpoints, do_pad=True, **common)


def _processor(spec: SyntheticSpec, tokenizer: Any) -> Any:
    from transformers import LlavaNextProcessor, LlavaProcessor

    cls = LlavaProcessor if spec.family == "llava" else LlavaNextProcessor
    return cls(
        image_processor=_image_processor(spec),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        # CLIP prepends a CLS embedding that the "default" strategy drops: the processor must know it to
        # expand <image> into exactly image_seq_length placeholders.
        num_additional_image_tokens=1,
    )


# The constant residual channel (see _suppress_tokens): its value is on the scale of the other embedding
# entries, so the hidden states and quantisation ranges stay as they would be; the final norm's gain on it is
# large because the residual stream grows with depth and would otherwise dilute it.
_CHANNEL = 0
_CHANNEL_VALUE = 0.05
_CHANNEL_GAIN = 1000.0


def _suppress_tokens(model: Any, token_ids: list[int]) -> None:
    """Make the language model unable to emit ``token_ids``, whether decoding greedily or sampling.

    A random LM picks </s> as often as any other token, so its replies would often end at once; it would also
    emit <image> (whose stray copies in a conversation's history no longer match its images) and lone bytes
    that decode to nothing readable. Zeroing those tokens' lm_head rows would only keep them from greedy
    decoding. Llama's lm_head has no bias, so one is built instead: residual channel 0 is held at a constant
    positive value (every token embedding, every image embedding and LLaVA-NeXT's row separator write it; no
    layer writes to it), so after the final RMSNorm it is still positive; the norm amplifies it, and only the
    suppressed tokens' lm_head rows read it, with a negative weight. Their logits then sit far below every
    other token's, while the other tokens' logits and everything upstream keep their random-model behaviour.
    """
    import torch

    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight[:, _CHANNEL] = _CHANNEL_VALUE
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[_CHANNEL, :] = 0.0
            layer.mlp.down_proj.weight[_CHANNEL, :] = 0.0
        projector = model.model.multi_modal_projector.linear_2
        projector.weight[_CHANNEL, :] = 0.0
        projector.bias[_CHANNEL] = _CHANNEL_VALUE
        newline = getattr(model.model, "image_newline", None)
        if newline is not None:
            newline[_CHANNEL] = _CHANNEL_VALUE
        lm.norm.weight[_CHANNEL] = _CHANNEL_GAIN
        head = model.get_output_embeddings().weight
        head[:, _CHANNEL] = 0.0
        head[token_ids, :] = 0.0
        head[token_ids, _CHANNEL] = -1.0


def _model(spec: SyntheticSpec, suppressed: list[int]) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = _model_config(spec)
    cls = LlavaForConditionalGeneration if spec.family == "llava" else LlavaNextForConditionalGeneration
    # Seed a private copy of the RNG state so that building a checkpoint leaves the caller's randomness alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = cls(config).eval()
    _suppress_tokens(model, suppressed)
    return model


def parameter_count(spec: SyntheticSpec) -> dict[str, int]:
    """Parameters of a model built from ``spec``: ``{"vision": ..., "projector": ..., "language": ..., "total": ...}``.

    ``language`` includes the token embeddings and ``lm_head``. Builds the model on the ``meta`` device, so it
    costs no memory.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = _model_config(spec)
    cls = LlavaForConditionalGeneration if spec.family == "llava" else LlavaNextForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, param in model.named_parameters():
        if "vision_tower" in name:
            counts["vision"] += param.numel()
        elif "multi_modal_projector" in name or "image_newline" in name:
            counts["projector"] += param.numel()
        else:
            counts["language"] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def build_checkpoint(out_dir: Path, spec: SyntheticSpec = TINY) -> Path:
    """Write a randomly initialised LLaVA checkpoint for ``spec`` to ``out_dir`` and return ``out_dir``.

    The folder holds what a Hugging Face LLaVA release holds: ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (float32), the tokenizer files, ``processor_config.json`` and the chat template,
    plus ``preprocessor_config.json`` with the image settings that openvino-genai reads. Nothing is
    downloaded; the same spec always gives the same weights and tokenizer.
    """
    import torch
    from transformers import GenerationConfig

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer, suppressed = _build_tokenizer(spec)
    processor = _processor(spec, tokenizer)
    model = _model(spec, suppressed)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    # float32 whatever torch's default dtype is, so the export chooses the weight format (fp16, int8...).
    model.to(torch.float32).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _name_tokenizer_class_portably(out_dir)
    _write_image_processor_config(out_dir, processor)

    log.info(
        "built synthetic %s checkpoint in %s (%.1f s, %d parameters)",
        spec.family,
        out_dir,
        time.perf_counter() - started,
        sum(p.numel() for p in model.parameters()),
    )
    return out_dir


def _name_tokenizer_class_portably(out_dir: Path) -> None:
    """Record the tokenizer class under the name that transformers 4 and 5 both resolve.

    transformers 5 saves its generic fast tokenizer as ``TokenizersBackend``, a name transformers 4 lacks;
    ``PreTrainedTokenizerFast`` is an alias for it in 5 and the class itself in 4.
    """
    path = out_dir / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_image_processor_config(out_dir: Path, processor: Any) -> None:
    """Write the image processor's settings as ``preprocessor_config.json`` unless it is already there.

    transformers 5 nests them in ``processor_config.json``; openvino-genai and older transformers look for
    the separate file.
    """
    target = out_dir / "preprocessor_config.json"
    if target.exists():
        return
    settings = processor.image_processor.to_dict()
    settings["processor_class"] = type(processor).__name__
    target.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
