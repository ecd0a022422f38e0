"""AutoAttack and natural-shift evaluation of a defended model C(T(.)), fanned out as Ray tasks; resumable.

    python -m oodray.evaluate --checkpoint runs/train-digits-unet-<hash>/checkpoint_<time>/translator.pt
    python -m oodray.evaluate --translator identity --dataset digits --n-examples 100    # the undefended C
    python -m oodray.evaluate --translator bitdepth --dataset digits --eps 0.1,0.2,0.3   # BPDA baseline
    python -m oodray.evaluate --checkpoint CKPT --threat-models adaptive --norm Linf,L2 --eps 0.5 --shards 4

Threat models, each named in every output file:
- `oblivious`: AutoAttack crafted against C alone, then fed through the defence.
- `adaptive`: AutoAttack against the DefendedModel end to end (the gate and `bitdepth` give straight-through BPDA
  gradients); version `rand` (EoT) is used instead of the requested one when the translator is stochastic in eval mode.
- `transfer`: AutoAttack against a surrogate classifier other than C (`classifier.seed + 1`, on
  `eval.surrogate_arch`/`eval.surrogate_weights` when set; trained and cached if missing), then fed through the
  defence. A surrogate that would be C itself (a pretrained C with `classifier.epochs=0`) is refused before work.
A point counts as robust when the defence classifies both x and its adversarial example correctly (the attacker may
submit either), so robust accuracy never exceeds the defence's clean accuracy.

Determinism: pyautoattack reseeds torch on every perturb() call and draws random starts of the whole batch's shape, so a
point's attack depends on which points share its batch (seen: the same 16 points attacked as one batch or as two
batches of 8 get adversarial images up to 2 eps apart). The evaluation subset is therefore cut into fixed blocks of
consecutive examples, each attacked on its own (one AutoAttack cascade, one batch per attack), and a shard is a
contiguous run of whole blocks. The block size depends only on n_examples and `eval.batch_size` (see `block_size`), so
every model call sees the same blocks whatever the number of shards, and the merged flags equal a single-process run
(shards=1) bit for bit. There are at most as many shards as blocks: lower `--batch-size` for more. Larger blocks
vectorise better (on CPU, digits' CNN: ~1.1 s per image that survives the cascade at 32 per block, ~11 s at 1).

out_dir holds `<threat>-<norm>-<eps>.json` per attack, `clean.json`, `shifts.json` and `summary.json`, each with the
resolved config; AutoAttack state per block lives under `state/`, so a killed task (retried by Ray) resumes there.
Finished results are reused; one made by a different evaluation is never overwritten (one-line error instead).
On a multi-node cluster put out_dir on shared storage so that a retried task finds its state on any node.
Time: `summary.json`'s `seconds` is the last run's; `wall_seconds_total` sums every attempt's wall time from the moment
it held out_dir (`wall.json`, killed attempts included, each short by at most 10 s) and `attempts` counts them (a
run that finds everything done is not an attempt);
`surrogate_train_seconds` is the transfer surrogate's training time, read from its checkpoint (it is trained once, in
whichever attempt first needs it, before that attempt holds out_dir).

Modules (each imports only those listed before it): `tasks` (Ray task bodies, block size), `plan` (inputs, shards,
result files), `sanity` (gradient-masking tells), `wall` (wall time over attempts), `driver` (`run_evaluation`: the
fan-out), `command` (the CLI).
"""

from oodray.evaluate.command import default_out_and_label, main
from oodray.evaluate.driver import MAX_RETRIES, TARGETS, EvaluationFailed, run_evaluation, summary_tables
from oodray.evaluate.plan import BASELINES, RESULT_FORMAT, _translator_state, result_name, shard_ranges
from oodray.evaluate.sanity import sanity_checks
from oodray.evaluate.tasks import attack_shard, block_size, clean_and_shifts, is_stochastic, shift_accuracies
from oodray.models.defended import build_defended

__all__ = ["BASELINES", "MAX_RETRIES", "RESULT_FORMAT", "TARGETS", "EvaluationFailed", "_translator_state",
           "attack_shard", "block_size", "build_defended", "clean_and_shifts", "default_out_and_label",
           "is_stochastic", "main", "result_name", "run_evaluation", "sanity_checks", "shard_ranges",
           "shift_accuracies", "summary_tables"]
