"""The demo model: a tiny Llama that this package builds and trains itself.

It needs no download. ``demo_model()`` trains a 2-layer Llama (hidden size 128,
two 64-wide heads) with a 512-token byte-level BPE tokenizer on the small corpus
beside this file, saves it as safetensors and returns its directory. The result
is cached, keyed by a hash of the corpus and the recipe, so the build (about half
a minute on two CPU cores) happens once per machine.

Training is deterministic and overfits the corpus on purpose, so greedy
completions are exact: ``"The capital of France is"`` gives ``" Paris."`` and
then the end-of-sequence token. That makes the model useful for tests and demos,
and useless for anything else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ... import paths

RECIPE_VERSION = 2
_HERE = Path(__file__).parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly."]


def _sources() -> tuple[list[str], list[tuple[str, str]]]:
    lines = [ln.strip() for ln in (_HERE / "corpus.txt").read_text().splitlines() if ln.strip()]
    pairs = []
    for ln in (_HERE / "chat.tsv").read_text().splitlines():
        if ln.strip():
            q, a = ln.split("\t")
            pairs.append((q.strip(), a.strip()))
    return lines, pairs


def _fingerprint() -> str:
    h = hashlib.sha256(f"recipe={RECIPE_VERSION}".encode())
    for name in ("corpus.txt", "chat.tsv", "__init__.py"):
        h.update((_HERE / name).read_bytes())
    return h.hexdigest()[:12]


def demo_model(path: str | os.PathLike | None = None, *, rebuild: bool = False) -> str:
    """Return the directory of the demo model, building it the first time.

    ``path`` overrides the cache location. Safe to call from several processes
    at once: one builds, the others wait for it.
    """
    target = Path(path) if path else paths.cache_root() / f"demo-llama-{_fingerprint()}"
    return build_once(target, "config.json", build, rebuild)


def demo_adapter(path: str | os.PathLike | None = None, *, base: str | None = None, rebuild: bool = False) -> str:
    """Return the folder of the demo LoRA adapter (rank 8) for the demo model, training it the first time.

    It is a PEFT adapter like any other (``adapter_config.json``, ``adapter_model.safetensors``). It
    teaches the demo model two changed facts, so its effect is exact: with it ``"A dog says"`` gives
    ``" meow."`` and ``"The sky is"`` gives ``" green."``; everything else stays as the base model says it.
    """
    base = base or demo_model()
    target = Path(path) if path else paths.cache_root() / f"demo-lora-{_fingerprint()}"
    return build_once(target, "adapter_config.json", lambda out: build_adapter(base, out), rebuild)


def build_once(target: Path, marker: str, builder, rebuild: bool) -> str:
    """``target``, built by ``builder`` into a temporary folder first (one process builds, others wait)."""
    if (target / marker).exists() and not rebuild:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / marker).exists() and not rebuild:
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            builder(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _chat_texts(pairs, bos: str, eos: str) -> list[str]:
    texts = []
    for q, a in pairs:
        texts.append(f"{bos}<|user|>{q}\n<|assistant|>{a}{eos}")
        for system in SYSTEM_PROMPTS:
            texts.append(f"{bos}<|system|>{system}\n<|user|>{q}\n<|assistant|>{a}{eos}")
    # Two-turn conversations, so a remembered earlier turn does not confuse the model.
    for (q1, a1), (q2, a2) in zip(pairs, pairs[1:] + pairs[:1]):
        texts.append(f"{bos}<|user|>{q1}\n<|assistant|>{a1}\n<|user|>{q2}\n<|assistant|>{a2}{eos}")
    return texts


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def build(out: Path, *, steps: int = 600, seed: int = 0, progress: bool = True) -> None:
    """Train the demo model and write it to ``out`` (a Hugging Face model folder), with a progress bar."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines, pairs = _sources()
    bos, eos = "<s>", "</s>"
    texts = [f"{bos}{ln}{eos}" for ln in lines] + _chat_texts(pairs, bos, eos)
    raw = _train_tokenizer(lines + [q + " " + a for q, a in pairs])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 2048

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    batch, mask, labels = _padded(tokenizer, texts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    with tqdm(total=steps, desc="training the demo model (once per machine)", unit="step",
              disable=not progress) as bar:
        for _ in range(steps):
            loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "vllm_notebook_demo.json").write_text(
        json.dumps({"recipe": RECIPE_VERSION, "steps": steps, "final_loss": float(loss.detach())}) + "\n"
    )


def _padded(tokenizer, texts: list[str]):
    """``texts`` as one right-padded batch: token ids, attention mask, and labels (-100 on padding)."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    batch = torch.full((len(ids), max(map(len, ids))), pad)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = torch.tensor(row)
    return batch, (batch != pad).long(), batch.masked_fill(batch == pad, -100)


ADAPTER_FACTS = {"A dog says woof.": "A dog says meow.", "The sky is blue.": "The sky is green."}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapter(base: str, out: Path, *, facts: dict[str, str] | None = None, rank: int = 8, alpha: int = 16,
                  steps: int = 150, seed: int = 0) -> None:
    """Train a LoRA adapter of ``rank`` on the demo corpus with ``facts`` (line → new line, default
    ``ADAPTER_FACTS``) changed; write it as PEFT does.

    The low-rank update ``B @ A`` (scaled by ``alpha / rank``) is added to each target projection by a
    forward hook, so no PEFT install is needed; the tensors are saved under PEFT's names.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines, _ = _sources()
    facts = ADAPTER_FACTS if facts is None else facts
    texts = [f"<s>{facts.get(ln, ln)}</s>" for ln in lines]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    scale = alpha / rank
    weights: dict[str, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        a = torch.nn.Parameter(torch.randn(rank, module.in_features) / module.in_features ** 0.5)
        b = torch.nn.Parameter(torch.zeros(module.out_features, rank))
        weights[f"base_model.model.{name}.lora_A.weight"] = a
        weights[f"base_model.model.{name}.lora_B.weight"] = b
        module.register_forward_hook(lambda m, inp, output, a=a, b=b: output + scale * (inp[0] @ a.T @ b.T))
    batch, mask, labels = _padded(tokenizer, texts)
    opt = torch.optim.AdamW(list(weights.values()), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": list(LORA_TARGETS), "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "use_rslora": False, "use_dora": False, "inference_mode": True,
              "base_model_name_or_path": str(base)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "vllm_notebook_demo.json").write_text(json.dumps({"steps": steps, "final_loss": float(loss.detach())}) + "\n")
