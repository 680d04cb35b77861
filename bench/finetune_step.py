"""Phase-A training step: ballad's loop (prompts tokenized once, encoded at the shortest exact context) against
the official loop (every step re-tokenizes every class prompt and encodes it at full context), same model,
same batch, measured in one run.

    python bench/finetune_step.py [--model ballad-tiny] [--classes fashion-mnist] [--batch 64] [--steps 5]
    python bench/finetune_step.py --model ViT-B-16 --classes imagenet --batch 128 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ballad_cache.inputs.datasets import load_templates, read_lines, resource_dir  # noqa: E402
from ballad_cache.models.clip import PromptBank, load_model, resolve_device  # noqa: E402
from ballad_cache.models.encoder import autocast  # noqa: E402
from ballad_cache.pipelines.finetune import phase_a_loss  # noqa: E402
from bench.common import write  # noqa: E402


def run_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps after one warm-up step."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ballad-tiny")
    p.add_argument("--classes", default="fashion-mnist", help="a class-name list in data/classnames")
    p.add_argument("--templates", default="ballad")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--label", default="finetune_step", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    device = resolve_device(a.device)
    loaded = load_model(a.model)
    classnames = read_lines(resource_dir() / "classnames" / f"{a.classes}.txt")
    templates = load_templates(a.templates)
    size = loaded.preprocess_cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(a.batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(len(classnames), (a.batch,), generator=gen).to(device)

    def make(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(model).to(device).train()
        model.logit_scale.requires_grad_(False)
        params = [q for q in model.parameters() if q.requires_grad]
        return model, torch.optim.SGD(params, lr=1e-5, momentum=0.9, weight_decay=5e-4)

    ours_model, ours_opt = make(loaded.model)
    bank = PromptBank(loaded, classnames, templates)

    def ours() -> None:
        with autocast(device, a.precision):  # phase A's forward with both towers trained (PhaseANet, prompts)
            image, text = F.normalize(ours_model.encode_image(images), dim=-1), bank.encode(ours_model)
            loss = phase_a_loss(image.float(), text.float(), labels, "ce")
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    ref_model, ref_opt = make(loaded.model)
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]

    def reference() -> None:
        tokens = loaded.tokenizer(prompts).to(device)  # re-tokenized, full context, every step
        with autocast(device, a.precision):
            image = F.normalize(ref_model.encode_image(images), dim=-1)
            text = F.normalize(ref_model.encode_text(tokens), dim=-1).view(len(classnames), len(templates), -1)
            text = F.normalize(text.mean(1), dim=-1)
            loss = F.cross_entropy(100.0 * image.float() @ text.float().T, labels)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    t_ours = run_steps(ours, a.steps, device)
    t_ref = run_steps(reference, a.steps, device)
    write(
        a.label,
        {
            "model": a.model,
            "classes": len(classnames),
            "templates": len(templates),
            "batch": a.batch,
            "precision": a.precision,
            "context": {"ballad": bank.context_length, "reference": bank.full_context},
            "images_per_s": {"ballad": round(a.batch / t_ours, 1), "reference": round(a.batch / t_ref, 1)},
            "speedup": round(t_ref / t_ours, 2),
            "target": "> 1",
        },
    )


if __name__ == "__main__":
    main()
