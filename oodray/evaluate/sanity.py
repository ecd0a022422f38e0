"""Sanity signals of an evaluation: AutoAttack's own warnings and the gradient-masking tells read off its results
(Square beating the white-box stages, transfer beating the adaptive attacker, accuracy rising with eps, above-chance
accuracy at the largest eps). Pure functions of the result records."""

from __future__ import annotations

from typing import Any


def sanity_checks(results: dict[tuple[str, str, float], dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    """Gradient-masking tells and AutoAttack's own warnings, as records (kind, threat_model, norm, eps, detail)."""
    out: list[dict[str, Any]] = []
    for (threat, norm, eps), r in results.items():
        where = {"threat_model": threat, "norm": norm, "eps": eps}
        out += [{"kind": "autoattack_message", **where, "detail": m} for m in r["messages"]]
        acc = r["target_stage_accuracy"]
        if "square" in acc and len(acc) > 2:
            names = list(acc)
            drops = {s: acc[names[i - 1]] - acc[s] for i, s in enumerate(names) if i > 0}
            white = {s: d for s, d in drops.items() if s != "square"}
            if drops["square"] > 0.002:  # AutoAttack's own threshold (checks.check_square_sr)
                out.append({"kind": "square_beats_whitebox", **where, "detail":
                            f"black-box Square lowered {r['target']} accuracy by {drops['square']:.2%} after the "
                            f"white-box stages (their drops: {', '.join(f'{k} {v:.2%}' for k, v in white.items())}); "
                            "the gradients may be masked: try an adaptive attack (BPDA/EoT) or more Square queries"})
    for (threat, norm, eps), r in results.items():
        a = results.get(("adaptive", norm, eps))
        if threat == "transfer" and a is not None and r["robust_accuracy"] < a["robust_accuracy"]:
            out.append({"kind": "transfer_beats_adaptive", "threat_model": "transfer", "norm": norm, "eps": eps,
                        "detail": f"transfer robust accuracy {r['robust_accuracy']:.4f} < adaptive "
                                  f"{a['robust_accuracy']:.4f}: the end-to-end gradients are weaker than a "
                                  "surrogate's (gradient masking)"})
    chance = 1.0 / num_classes
    for threat, norm in sorted({(t, n) for t, n, _ in results}):
        curve = sorted((e, results[(t, n, e)]["robust_accuracy"]) for t, n, e in results if (t, n) == (threat, norm))
        where = {"threat_model": threat, "norm": norm}
        for (e0, a0), (e1, a1) in zip(curve, curve[1:]):
            if a1 > a0:
                out.append({"kind": "accuracy_rises_with_eps", **where, "eps": e1, "detail":
                            f"robust accuracy {a1:.4f} at eps {e1:g} > {a0:.4f} at eps {e0:g}: a stronger attacker "
                            "should never do worse (unreliable attack or gradient masking)"})
        if len(curve) > 1 and curve[-1][1] > chance:
            out.append({"kind": "above_chance_at_largest_eps", **where, "eps": curve[-1][0], "detail":
                        f"robust accuracy {curve[-1][1]:.4f} at the largest eps {curve[-1][0]:g} is above chance "
                        f"({chance:.3f}); suspicious if that eps is large enough to erase the image"})
    return out
