"""Summaries of a vectors file: metadata, per-layer norms, cosine similarity between emotions, and a plot."""

from __future__ import annotations

from pathlib import Path

import torch

from .bank import EmotionBank


def cosine_matrix(bank: EmotionBank) -> torch.Tensor:
    """Cosine similarity between emotions of the whole vectors (all layers concatenated): [E, E]."""
    flat = bank.vectors.permute(1, 0, 2).reshape(len(bank.emotions), -1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat @ flat.T


def summary(bank: EmotionBank, path: Path | None = None) -> dict:
    norms = bank.norms()
    return {
        "file": str(path) if path else None,
        "emotions": bank.emotions,
        "hook": bank.hook,
        "layers": bank.layers,
        "hidden_size": bank.hidden_size,
        "model": bank.model,
        "recipe": bank.recipe,
        "calibration": bank.calibration,
        "units": bank.units,
        "bands": bank.bands,
        "typical_norms": bank.typical_norms,
        "norms": {e: [round(float(v), 4) for v in norms[:, i]] for i, e in enumerate(bank.emotions)},
        "cosine": {e: [round(float(v), 4) for v in row] for e, row in zip(bank.emotions, cosine_matrix(bank))},
    }


MEANING = {"dose": "intensity x dose x typical norm x unit vector", "alpha": "intensity x alpha x vector"}


def render_text(info: dict) -> str:
    lines = [
        f"file        {info['file']}",
        f"model       {info['model'].get('name') or '?'} ({info['model'].get('architecture') or '?'}, "
        f"{info['model'].get('num_layers') or '?'} layers)",
        f"hook        {info['hook']}",
        f"shape       {len(info['layers'])} layers x {len(info['emotions'])} emotions x {info['hidden_size']}",
        f"layers      {info['layers'][0]}..{info['layers'][-1]}",
        f"units       {info['units']} ({MEANING[info['units']]})",
        f"calibrated  {info['calibration'] or 'no (intensity = the plain ' + info['units'] + ')'}",
        f"bands       {info['bands'] or 'none (every layer)'}",
        "",
        "L2 norm per layer" + (" (last column: typical activation norm)" if info["typical_norms"] else "") + ":",
        "layer " + "".join(f"{e:>9}" for e in info["emotions"]) + ("  typical" if info["typical_norms"] else ""),
    ]
    for i, layer in enumerate(info["layers"]):
        typical = f"{info['typical_norms'][i]:>9.3f}" if info["typical_norms"] else ""
        lines.append(f"{layer:>5} " + "".join(f"{info['norms'][e][i]:>9.3f}" for e in info["emotions"]) + typical)
    lines += ["", "cosine similarity (all layers):", "        " + "".join(f"{e:>9}" for e in info["emotions"])]
    for e in info["emotions"]:
        lines.append(f"{e:>8}" + "".join(f"{v:>9.3f}" for v in info["cosine"][e]))
    return "\n".join(lines)


def plot(info: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for e in info["emotions"]:
        left.plot(info["layers"], info["norms"][e], label=e, marker=".")
    left.set(xlabel="layer", ylabel="L2 norm", title=f"emotion vector norm per layer ({info['hook']})")
    left.legend()
    matrix = [info["cosine"][e] for e in info["emotions"]]
    image = right.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
    right.set_xticks(range(len(info["emotions"])), info["emotions"], rotation=45)
    right.set_yticks(range(len(info["emotions"])), info["emotions"])
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            right.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    right.set_title("cosine similarity between emotions")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
