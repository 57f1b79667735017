"""The trade-off plot: skill kept against forgetting left, one series per method, the base and
the fine-tune as references, the chosen point marked, the skill floor as a line.

Written as PNG (for the model card on the Hub) and SVG (for docs), with matplotlib's Agg backend
(no display). Where forgetting_left is undefined (the fine-tune did not raise perplexity) the x
axis is perplexity instead, and the axis label says so.
"""

from __future__ import annotations

from pathlib import Path

PNG, SVG = "evaluation.png", "evaluation.svg"


def write_plot(
    directory: Path,
    points: list[dict],
    references: dict[str, dict],
    chosen: dict | None,
    floor: float | None,
) -> list[str]:
    """Write evaluation.png and evaluation.svg into `directory`; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defined = all(p.get("forgetting_left") is not None for p in [*points, *references.values()])
    x_key = "forgetting_left" if defined else "perplexity"

    def y(point: dict) -> float:
        return point["skill_kept"] if point.get("skill_kept") is not None else float("nan")

    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for method in sorted({p["method"] for p in points}):
        series = sorted((p for p in points if p["method"] == method), key=lambda p: p["sparsity"])
        axes.plot([p[x_key] for p in series], [y(p) for p in series], "o-", label=method, alpha=0.8)
        for p in series:
            axes.annotate(
                f"{p['sparsity']:g}", (p[x_key], y(p)), fontsize=7, xytext=(3, 3),
                textcoords="offset points",
            )  # fmt: skip
    for name, ref, marker in (("base", references.get("base"), "s"),
                              ("fine-tuned", references.get("finetuned"), "D")):  # fmt: skip
        if ref is not None:
            axes.plot([ref[x_key]], [y(ref)], marker, color="black", label=name)
    if chosen is not None:
        axes.plot(
            [chosen[x_key]], [y(chosen)], "*", markersize=18, color="gold",
            markeredgecolor="black",
            label=f"chosen: {chosen['method']} at {chosen['sparsity']:g}",
        )  # fmt: skip
    if floor is not None:
        axes.axhline(floor, linestyle="--", color="gray", linewidth=1, label=f"floor {floor:g}")
    axes.set_xlabel(
        "forgetting left (0 = base, 1 = fine-tuned)"
        if defined
        else "general perplexity (forgetting undefined: the fine-tune did not raise it)"
    )
    axes.set_ylabel("skill kept (fraction of the fine-tune's)")
    axes.set_title("Skill kept vs forgetting left")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    # No timestamps in the files: a re-run writes the same bytes.
    figure.savefig(directory / PNG, format="png", metadata={"Software": None})
    figure.savefig(directory / SVG, format="svg", metadata={"Date": None})
    plt.close(figure)
    return [PNG, SVG]


SEARCH_PNG, SEARCH_SVG = "nps_search.png", "nps_search.svg"


def write_search_plot(directory: Path, nps: dict) -> list[str]:
    """Write nps_search.png/.svg: each generation's best and mean fitness, the best so far, and
    magnitude's fitness (the all-ones candidate, generation 0) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = [g for g in nps["generations"] if g["index"] > 0]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for key, style in (("best", "o-"), ("mean", "s--"), ("best_so_far", "-")):
        series = [(g["index"], g[key]) for g in generations if g[key] is not None]
        if series:
            axes.plot(*zip(*series, strict=True), style, label=key.replace("_", " "), alpha=0.8)
    if nps["magnitude_fitness"] is not None:
        axes.axhline(
            nps["magnitude_fitness"], linestyle=":", color="gray", label="magnitude (all ones)"
        )
    axes.set_xlabel("generation")
    axes.set_ylabel(f"fitness ({nps['objective']})")
    axes.set_title(f"NPS search at sparsity {nps['sparsity']:g} ({nps['bands']} bands)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(directory / SEARCH_PNG, format="png", metadata={"Software": None})
    figure.savefig(directory / SEARCH_SVG, format="svg", metadata={"Date": None})
    plt.close(figure)
    return [SEARCH_PNG, SEARCH_SVG]
