"""``python -m pgolf.eval.significance RUN_A... --vs RUN_B...``: is A's score better than B's across seeds?

Each side is a list of sources, one or more seeds each: pgolf run folders (``summary.json`` and/or ``train.log``),
submission folders (``submission.json`` and ``train_seed<N>.log``, pgolf-pack's or a challenge record's), single
train logs, and, for ``--vs`` only, a record's published per-seed val_bpb given as numbers (``1.08079`` or
``1.08079,1.08103,1.08118``). Lower is better; A is the candidate, B the baseline. The command prints each side's
seeds and the mean and sample std (n − 1) of val_bpb and val_loss, the difference of the means A − B in bpb and in
nats, and a one-sided Welch t-test for each of the two rules in use:

1. **The challenge README's rule**: a record must "beat the existing SOTA by at least 0.005 nats" and "provide
   enough run logs to show at p < 0.01 that they achieved the required 0.005-nat improvement" (openai/parameter-golf
   README, "Submission process", rule 1). Tested on val_loss (nats per token) with the null hypothesis
   "improvement ≤ 0.005 nats": ``t = (mean_B − mean_A − 0.005) / sqrt(s_A²/n_A + s_B²/n_B)``, met when p < 0.01.
2. **The threshold applied to late entries**: the leaderboard update openai/parameter-golf PR #1902 (cocohearts,
   merged 2026-04-29) "applies the p<0.25 chronological progression cutoff" (its description); its commit
   13e76acdc "Apply p-value progression leaderboard cutoff" wrote "under the current p<0.25 rule, its 3-seed sweep
   beats #1493 (p≈0.020)" for PR #1514, and the merged README keeps "p=0.020", "p=0.001", "p=0.063" and "p=0.188"
   beside the rows it admitted. The maintainers' text names no test; a one-sided Welch test on the per-seed val_bpb
   with no minimum gain reproduces their number (PR #1514's seeds 1.07928348, 1.07996676, 1.08024795 against
   #1493's 1.08079, 1.08103, 1.08118 give p = 0.0204; ``tests/eval/test_significance.py`` checks it), and a
   participant describes the policy in those words (PR #1967: "one-sided Welch's t-test, p < 0.25 vs the previous
   frontier row"). Tested on val_bpb, null "improvement ≤ 0", met when p < 0.25.

p comes from the Student t distribution of ``scipy.stats`` with the Welch–Satterthwaite degrees of freedom. A side
with fewer than two seeds has no std, so no p and no verdict (said so, not guessed). When neither side varies at
all the test is degenerate: p is 0 if the gain exceeds the margin, else 1, and a note says so.

**bpb and nats.** val_loss is nats per token and val_bpb bits per byte of the same evaluation, so
``val_loss = val_bpb · ln 2 · bytes/token``. A published number is a val_bpb only: the nats rule cannot be decided
for its side, and the output says which side lacks val_loss and what ratio the other side's runs imply. Nothing
is converted unless ``--bytes-per-token R`` is given (the validation set's bytes per token for that tokenizer);
converted values are marked and any disagreement with the ratio seen in runs that have both numbers is noted.

**Which score.** A pgolf run's score is the one pgolf-pack submits: the artifact's plain eval (``summary.json``
``artifact.val_bpb``, the log's ``final_quant_roundtrip_exact`` line), or the pre-quant ``final`` eval of a run
without an artifact. Another log's score is its last evaluation line after training
(``<label> val_loss:<x> val_bpb:<y>``, not a ``step:``/``N/M`` line: ``final_int8_zlib_roundtrip_exact``,
``quantized_ttt_phased``, ...). ``--line LABEL`` (candidate side) and ``--vs-line LABEL`` (baseline side) pick a
named line instead (e.g. ``final_quant_sliding_window_exact`` for pgolf, ``quantized_sliding_window`` for a record);
``--list-lines`` prints every log's labels. Every seed is printed with where its number came from. A submission folder's
logs are read when it has ``train_seed*.log`` files, otherwise its ``submission.json`` per-seed numbers
(``seed_results``, ``seeds`` as a mapping, or ``seeds`` with ``seed_scores``, or pgolf's single ``seed``); when both
exist they are compared and a mismatch is noted.

Errors name the argument or file and what to do (:mod:`pgolf.errors`); ``--json OUT`` refuses an existing file
unless ``--force`` and is written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pgolf.errors import ConfigError, InputError, MismatchError, MissingInputError, run_cli

README_MARGIN_NATS = 0.005
README_ALPHA = 0.01
LATE_ALPHA = 0.25
PGOLF_SCORE_LINE = "final_quant_roundtrip_exact"  # the line of pgolf's submitted score (artifact, plain eval)
MISMATCH_TOL = 1e-4  # submission.json numbers are often rounded to 4-5 decimals


@dataclass(frozen=True)
class SeedScore:
    """One training run's score. ``val_loss`` (nats/token) is None for a published bpb-only number."""

    seed: int | None
    val_bpb: float
    val_loss: float | None
    source: str  # the file (or argument) the number came from
    line: str  # which evaluation: a log label, a summary key, or "published number"
    loss_converted: bool = False  # val_loss computed from val_bpb with --bytes-per-token


@dataclass
class SideStats:
    """Mean and sample std (n − 1; None for n < 2) of one side; loss stats None when a seed lacks val_loss."""

    n: int
    bpb_mean: float
    bpb_std: float | None
    loss_mean: float | None
    loss_std: float | None


@dataclass
class RuleResult:
    """One rule's one-sided Welch test. ``met`` is None when it cannot be decided (``reason`` says why)."""

    name: str
    metric: str  # "val_loss" (nats) or "val_bpb"
    margin: float  # the gain the null hypothesis allows, in the metric's unit
    alpha: float
    t: float | None = None
    df: float | None = None
    p: float | None = None
    met: bool | None = None
    reason: str = ""


@dataclass
class Comparison:
    """Everything the command prints: both sides, the differences A − B and the two rules."""

    a: list[SeedScore]
    b: list[SeedScore]
    a_stats: SideStats
    b_stats: SideStats
    diff_bpb: float  # mean_A − mean_B (negative: A is better)
    diff_nats: float | None
    rules: list[RuleResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the comparison ---------------------------------------------------------------------------------------------

def compare(a: Sequence[SeedScore], b: Sequence[SeedScore], *, bytes_per_token: float | None = None,
            lines_chosen: bool = False) -> Comparison:
    """Both rules for candidate ``a`` against baseline ``b`` (each a non-empty list of per-seed scores).

    With ``bytes_per_token`` the seeds without val_loss get ``val_bpb · ln 2 · bytes_per_token`` (marked).
    ``lines_chosen``: the user named the evaluations (--line, --vs-line), so differing labels are not noted.
    """
    if not a or not b:
        raise ConfigError("each side needs at least one score (RUN_A... and --vs RUN_B...)")
    notes: list[str] = []
    if bytes_per_token is not None:
        a, b = (_convert_missing_loss(side, bytes_per_token) for side in (a, b))
        notes += _ratio_disagreements([*a, *b], bytes_per_token)
    sa, sb = side_stats(a), side_stats(b)
    diff_nats = None if sa.loss_mean is None or sb.loss_mean is None else sa.loss_mean - sb.loss_mean
    rules = [
        welch_rule("README: improvement >= 0.005 nats at p < 0.01", "val_loss", README_MARGIN_NATS, README_ALPHA,
                   a, b),
        welch_rule("late entries (PR #1902): improvement > 0 at p < 0.25", "val_bpb", 0.0, LATE_ALPHA, a, b),
    ]
    if diff_nats is None:
        notes.append(_missing_loss_note(a, b))
    notes += _line_notes(a, b, lines_chosen)
    notes += [f"{rule.name}: {rule.reason}" for rule in rules if rule.met is not None and rule.reason]
    return Comparison(list(a), list(b), sa, sb, sa.bpb_mean - sb.bpb_mean, diff_nats, rules, notes)


def welch_rule(name: str, metric: str, margin: float, alpha: float, a: Sequence[SeedScore],
               b: Sequence[SeedScore]) -> RuleResult:
    """The one-sided Welch test of "B's mean minus A's mean exceeds ``margin``" on ``metric``, decided at ``alpha``."""
    rule = RuleResult(name, metric, margin, alpha)
    xa, xb = _values(a, metric), _values(b, metric)
    if xa is None or xb is None:
        side = "A" if xa is None else "B"
        rule.reason = f"side {side} has seeds without val_loss (published bpb numbers); see the note below"
        return rule
    if len(xa) < 2 or len(xb) < 2:
        rule.reason = (f"Welch's test needs at least 2 seeds per side (A has {len(xa)}, B has {len(xb)}); "
                       f"add seeds")
        return rule
    rule.t, rule.df, rule.p = welch_one_sided(xa, xb, margin)
    rule.met = rule.p < alpha
    if math.isinf(rule.t):
        rule.reason = "neither side varies at all, so the test is degenerate (p is 0 or 1)"
    return rule


def welch_one_sided(x: Sequence[float], y: Sequence[float], margin: float = 0.0) -> tuple[float, float, float]:
    """(t, df, p) of Welch's test of H1: mean(y) − mean(x) > margin (x lower by more than margin).

    x, y: at least 2 values each. ``t = (ȳ − x̄ − margin) / sqrt(s_x²/n_x + s_y²/n_y)`` with sample variances,
    df by Welch–Satterthwaite, p = P(T_df ≥ t) from ``scipy.stats.t``. Zero spread on both sides: t = ±inf and p =
    0 or 1 (df = n_x + n_y − 2).
    """
    from scipy import stats

    nx, ny = len(x), len(y)
    vx, vy = statistics.variance(x) / nx, statistics.variance(y) / ny
    gain = statistics.fmean(y) - statistics.fmean(x) - margin
    if vx + vy == 0.0:
        return (math.inf if gain > 0 else -math.inf), float(nx + ny - 2), (0.0 if gain > 0 else 1.0)
    t = gain / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (nx - 1) + vy ** 2 / (ny - 1))
    return t, df, float(stats.t.sf(t, df))


def side_stats(side: Sequence[SeedScore]) -> SideStats:
    """Mean and sample std of val_bpb and (when every seed has one) val_loss."""
    bpb = [s.val_bpb for s in side]
    loss = _values(side, "val_loss")
    return SideStats(len(side), statistics.fmean(bpb), _std(bpb),
                     None if loss is None else statistics.fmean(loss), None if loss is None else _std(loss))


def _std(v: Sequence[float]) -> float | None:
    return statistics.stdev(v) if len(v) > 1 else None


def _values(side: Sequence[SeedScore], metric: str) -> list[float] | None:
    vals = [getattr(s, metric) for s in side]
    return None if any(v is None for v in vals) else vals


def _convert_missing_loss(side: Sequence[SeedScore], bytes_per_token: float) -> list[SeedScore]:
    return [s if s.val_loss is not None else
            SeedScore(s.seed, s.val_bpb, s.val_bpb * math.log(2) * bytes_per_token, s.source, s.line, True)
            for s in side]


def implied_bytes_per_token(s: SeedScore) -> float | None:
    """val_loss / (val_bpb · ln 2) of a seed that reports both (None otherwise)."""
    if s.val_loss is None or s.loss_converted or s.val_bpb <= 0:
        return None
    return s.val_loss / (s.val_bpb * math.log(2))


def _ratio_disagreements(scores: Sequence[SeedScore], bytes_per_token: float) -> list[str]:
    seen = [r for r in map(implied_bytes_per_token, scores) if r is not None]
    if seen and max(abs(r / bytes_per_token - 1) for r in seen) > 0.01:
        return [f"--bytes-per-token {bytes_per_token:g} differs by more than 1% from the ratio the runs with both "
                f"numbers imply ({min(seen):.4f}..{max(seen):.4f}): were they evaluated on another tokenizer or "
                f"validation set?"]
    return []


def _missing_loss_note(a: Sequence[SeedScore], b: Sequence[SeedScore]) -> str:
    seen = [r for r in map(implied_bytes_per_token, [*a, *b]) if r is not None]
    hint = (f"; the seeds that report both imply {statistics.fmean(seen):.4f} bytes/token, so if the bpb-only seeds "
            f"were scored on the same tokenizer and validation set, pass --bytes-per-token {statistics.fmean(seen):.4f}"
            if seen else "; pass --bytes-per-token R (validation bytes per token of that tokenizer) to convert")
    return ("val_loss (nats) is unknown for published bpb numbers, so the nats difference and the README rule "
            "cannot be computed; the bpb difference and the PR #1902 test can" + hint)


def _line_notes(a: Sequence[SeedScore], b: Sequence[SeedScore], chosen: bool) -> list[str]:
    lines = {side: sorted({s.line for s in seeds if s.line != "published number"}) for side, seeds in
             (("A", a), ("B", b))}
    notes = [f"side {side} mixes evaluations: {', '.join(ls)}" for side, ls in lines.items() if len(ls) > 1]
    if not chosen and len(lines["A"]) == 1 and len(lines["B"]) == 1 and lines["A"] != lines["B"]:
        notes.append(f"the sides' scores come from differently named evaluations ({lines['A'][0]} against "
                     f"{lines['B'][0]}); make sure they are the same kind (plain, sliding, after TTT), or pick them "
                     f"with --line and --vs-line")
    return notes


# ---- reading scores ---------------------------------------------------------------------------------------------

def read_scores(arg: str, *, line: str | None = None, numbers_ok: bool = False, flag: str = "RUN_A") -> list[SeedScore]:
    """The per-seed scores of one command-line item: a folder, a log file or (``numbers_ok``) numbers."""
    path = Path(arg)
    if path.is_dir():
        if (path / "submission.json").is_file() or list(path.glob("train_seed*.log")):
            return read_pack_dir(path, line=line)
        if (path / "summary.json").is_file() or (path / "train.log").is_file():
            return [read_run_dir(path, line=line)]
        raise InputError(f"{flag} {arg}: the folder has no summary.json or train.log (a pgolf run) and no "
                         f"submission.json or train_seed*.log (a submission folder); pass one of those")
    if path.is_file():
        if path.name == "summary.json":
            return [read_run_dir(path.parent, line=line, use_log=False)]
        if path.name == "submission.json":
            return read_submission_json(path)
        return [read_log(path, line=line)]
    numbers = _parse_numbers(arg)
    if numbers is None:
        raise MissingInputError(f"{flag} {arg}: no such file or folder" + (" and not a number" if numbers_ok else "")
                                + "; pass a run folder, a submission folder, a train log"
                                + (" or published val_bpb numbers (1.0811 or 1.0808,1.0810)" if numbers_ok else ""))
    if not numbers_ok:
        raise ConfigError(f"{flag} {arg}: numbers are accepted only after --vs (a record's published per-seed "
                          f"scores); the candidate side must be runs, submission folders or logs")
    return [SeedScore(None, v, None, f"--vs {arg}", "published number") for v in numbers]


def read_run_dir(run_dir: Path, *, line: str | None = None, use_log: bool = True) -> SeedScore:
    """The score of a pgolf run folder: from ``summary.json`` (exact), else from ``train.log``."""
    summary, log = run_dir / "summary.json", run_dir / "train.log"
    if summary.is_file():
        s = _load_json(summary)
        got = _summary_score(s, summary, line)
        if got is not None:
            return got
        if not (use_log and log.is_file()):
            raise InputError(f"{summary} has no evaluation named {line!r} (it has the pgolf evals "
                             f"{', '.join(_SUMMARY_LINES)}); pass the run's train log to read other lines")
    return read_log(log, line=line)


_SUMMARY_LINES = {  # pgolf log label -> (summary key path) of the same number
    "final_quant_roundtrip_exact": ("artifact",), "final_quant_roundtrip": ("artifact",),
    "final_quant_sliding_window_exact": ("artifact", "sliding"), "final_quant_sliding_window": ("artifact", "sliding"),
    "final": (), "final_sliding": ("sliding",),
}


def _summary_score(s: dict[str, Any], path: Path, line: str | None) -> SeedScore | None:
    """The score named by ``line`` (default: the submitted one) from a pgolf summary; None for a non-pgolf label."""
    if not isinstance(s, dict) or "config" not in s or "val_bpb" not in s:
        raise InputError(f"{path} is not a pgolf run summary (no config or val_bpb); pass a pgolf run folder")
    if s.get("status", "complete") != "complete":
        raise InputError(f"{path}: the run is not complete (status {s.get('status')!r}); finish it (see the summary's "
                         f"resume commands) or leave it out")
    label = line or (PGOLF_SCORE_LINE if s.get("artifact") else "final")
    if label not in _SUMMARY_LINES:
        return None
    node: Any = s
    for key in _SUMMARY_LINES[label]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or node.get("val_bpb") is None:
        raise InputError(f"{path} has no {label!r} result (that evaluation did not run); choose another --line")
    seed = (s.get("config") or {}).get("seed")
    return SeedScore(seed, _finite(node["val_bpb"], path, "val_bpb"), _finite(node.get("val_loss"), path, "val_loss"),
                     str(path), label)


def read_pack_dir(folder: Path, *, line: str | None = None) -> list[SeedScore]:
    """The seeds of a submission folder: its ``train_seed*.log`` files, else its ``submission.json``."""
    logs = sorted(folder.glob("train_seed*.log"))
    sub = folder / "submission.json"
    if not logs:
        return read_submission_json(sub)
    scores = [read_log(p, line=line) for p in logs]
    if sub.is_file() and line is None:  # an explicit --line may pick another evaluation than the submitted one
        published = {s.seed: s for s in read_submission_json(sub, required=False)}
        for s in scores:
            p = published.get(s.seed)
            if p is not None and abs(p.val_bpb - s.val_bpb) > MISMATCH_TOL:
                raise MismatchError(f"{s.source}: its {s.line} line says val_bpb {s.val_bpb:.8f} but {sub} gives seed "
                                    f"{s.seed} {p.val_bpb:.8f}; the submitted score is another line of the log, "
                                    f"pick it with --line LABEL (the log's labels are printed by --list-lines)")
    return scores


def read_submission_json(path: Path, *, required: bool = True) -> list[SeedScore]:
    """Per-seed scores of a ``submission.json``: ``seed_results`` / ``seeds`` (mapping) / ``seeds`` + ``seed_scores``,
    or pgolf-pack's single ``seed`` with ``val_bpb`` and ``val_loss``."""
    d = _load_json(path)
    rows = _submission_rows(d) if isinstance(d, dict) else None
    if rows is None:
        if not required:
            return []
        raise InputError(f"{path} lists no per-seed scores (no seed_results, seeds with seed_scores, or a single "
                         f"seed with val_bpb); pass the folder's train logs instead")
    return [SeedScore(_seed(seed), _finite(bpb, path, "val_bpb"), _finite(loss, path, "val_loss"), str(path),
                      "submission.json") for seed, bpb, loss in rows]


def _submission_rows(d: dict[str, Any]) -> list[tuple[Any, Any, Any]] | None:
    for key in ("seed_results", "seeds"):
        per = d.get(key)
        if isinstance(per, dict) and per and all(isinstance(v, dict) and "val_bpb" in v for v in per.values()):
            return [(k, v["val_bpb"], v.get("val_loss")) for k, v in per.items()]
    if isinstance(d.get("seeds"), list) and isinstance(d.get("seed_scores"), list) \
            and len(d["seeds"]) == len(d["seed_scores"]) and d["seeds"]:
        return [(k, v, None) for k, v in zip(d["seeds"], d["seed_scores"])]
    if "seed" in d and d.get("val_bpb") is not None:
        return [(d["seed"], d["val_bpb"], d.get("val_loss"))]
    return None


_EVAL = re.compile(r"val_loss:\s*(\S+)\s+val_bpb:\s*(\S+)")
_TRAINING = re.compile(r"^(step:|\d+/\d+$)")
_SEED_NAME = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)
_SEED_LINE = re.compile(r"^\s*seed\s*[:=]\s*(\d+)\s*$")


def read_log(path: Path, *, line: str | None = None) -> SeedScore:
    """The score in a train log: the ``line`` label's last line, else pgolf's submitted line, else the last eval."""
    lines = eval_lines(path)
    if not lines:
        raise InputError(f"{path} has no evaluation line (`<label> val_loss:<x> val_bpb:<y>` after training); "
                         f"the run did not finish, or this is not a train log")
    want = line or (PGOLF_SCORE_LINE if any(lab == PGOLF_SCORE_LINE for lab, _, _ in lines) else None)
    picked = [t for t in lines if want is None or t[0] == want]
    if not picked:
        raise InputError(f"{path} has no line labelled {want!r}; its evaluation lines are: "
                         f"{', '.join(dict.fromkeys(lab for lab, _, _ in lines))}")
    label, loss, bpb = picked[-1]
    if not (math.isfinite(loss) and math.isfinite(bpb)):
        raise InputError(f"{path}: its {label} line is not finite (val_loss {loss}, val_bpb {bpb}); the run "
                         f"diverged, leave it out")
    return SeedScore(log_seed(path), bpb, loss, str(path), label)


def eval_lines(path: Path) -> list[tuple[str, float, float]]:
    """(label, val_loss, val_bpb) of every evaluation line after training in the log at ``path``, in order."""
    out = []
    for i, text in enumerate(_read_text(path).splitlines(), 1):
        m = _EVAL.search(text)
        if not m:
            continue
        label = text[:m.start()].strip()
        if _TRAINING.match(label):
            continue
        try:
            loss, bpb = float(m.group(1)), float(m.group(2))
        except ValueError:
            raise InputError(f"{path}:{i}: cannot read numbers from {text.strip()!r}") from None
        out.append((label, loss, bpb))
    return out


def log_seed(path: Path) -> int | None:
    """The seed of a log: from its name (``train_seed42.log``), pgolf's ``config:`` line, or a ``seed: N`` line."""
    m = _SEED_NAME.search(path.name)
    if m:
        return int(m.group(1))
    for text in _read_text(path).splitlines():
        if text.startswith("config: "):
            try:
                seed = json.loads(text[len("config: "):]).get("train", {}).get("seed")
            except (json.JSONDecodeError, AttributeError):
                seed = None
            if seed is not None:
                return int(seed)
        m = _SEED_LINE.match(text)
        if m:
            return int(m.group(1))
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a log file") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix or replace the file") from None


def _finite(v: Any, path: Path, key: str) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{path}: {key} is {v!r}, not a number") from None
    if not math.isfinite(x):
        raise InputError(f"{path}: {key} is {v!r}; the run diverged, leave it out")
    return x


def _seed(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _parse_numbers(arg: str) -> list[float] | None:
    try:
        vals = [float(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        return None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    return vals


# ---- output -----------------------------------------------------------------------------------------------------

def format_comparison(c: Comparison) -> str:
    """The report as text (what the command prints)."""
    out = []
    for name, seeds, st in (("A (candidate)", c.a, c.a_stats), ("B (--vs)", c.b, c.b_stats)):
        out.append(f"side {name}: {st.n} seed{'s' if st.n != 1 else ''}")
        for s in seeds:
            loss = "       n/a" if s.val_loss is None else f"{s.val_loss:.8f}" + (" (converted)" if s.loss_converted
                                                                                    else "")
            out.append(f"  seed {'?' if s.seed is None else s.seed:>6}  val_bpb {s.val_bpb:.8f}  val_loss {loss}  "
                       f"[{s.line}] {s.source}")
        out.append(f"  mean val_bpb {st.bpb_mean:.8f}  std {_f(st.bpb_std)}   "
                   f"mean val_loss {_f(st.loss_mean)}  std {_f(st.loss_std)}")
    better = "A is better" if c.diff_bpb < 0 else "A is not better"
    nats = "n/a (see note)" if c.diff_nats is None else f"{c.diff_nats:+.6f} nats"
    out.append(f"difference A - B: {c.diff_bpb:+.6f} bpb, {nats} ({better}; negative = lower loss)")
    for r in c.rules:
        verdict = {True: "MET", False: "NOT MET", None: "CANNOT DECIDE"}[r.met]
        test = ("" if r.p is None else f"  t={r.t:.3f} df={r.df:.2f} one-sided p={r.p:.4g}")
        out.append(f"{r.name}: {verdict}{test}" + (f" ({r.reason})" if r.met is None else ""))
    out += [f"note: {n}" for n in c.notes]
    return "\n".join(out)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.8f}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("pgolf.eval.significance", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.list_lines:
        for item in [*args.runs, *args.vs]:
            for p in _log_files(item):
                print(f"{p}: {', '.join(dict.fromkeys(lab for lab, _, _ in eval_lines(p)))}")
        return 0
    a = [s for item in args.runs for s in read_scores(item, line=args.line, flag="RUN_A")]
    b = [s for item in args.vs for s in read_scores(item, line=args.vs_line, numbers_ok=True, flag="--vs")]
    _check_distinct(a, b)
    c = compare(a, b, bytes_per_token=args.bytes_per_token, lines_chosen=bool(args.line or args.vs_line))
    print(format_comparison(c))
    if args.json:
        from pgolf.utils import atomic_write_json

        atomic_write_json(args.json, c.to_dict())
        print(f"wrote {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pgolf.eval.significance",
                                 description="Welch t-tests of a candidate's seeds against a baseline's, for the "
                                             "challenge README rule and the PR #1902 late-entry threshold.")
    ap.add_argument("runs", nargs="+", metavar="RUN_A", help="candidate: run folders, submission folders, train logs")
    ap.add_argument("--vs", nargs="+", required=True, metavar="RUN_B",
                    help="baseline: run folders, submission folders, train logs, or published val_bpb numbers")
    ap.add_argument("--line", default=None, metavar="LABEL",
                    help="candidate side: read the evaluation with this log label (e.g. "
                         "final_quant_sliding_window_exact) instead of the submitted score")
    ap.add_argument("--vs-line", default=None, metavar="LABEL",
                    help="baseline side: the same (e.g. quantized_sliding_window for a record's logs)")
    ap.add_argument("--bytes-per-token", type=float, default=None, metavar="R",
                    help="convert bpb-only numbers to nats: val_loss = val_bpb * ln2 * R")
    ap.add_argument("--list-lines", action="store_true", help="print the evaluation labels of every log and stop")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the comparison as JSON")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    return ap


def _check_args(args: argparse.Namespace) -> None:
    from pgolf.utils import check_output

    if args.bytes_per_token is not None and not (math.isfinite(args.bytes_per_token) and args.bytes_per_token > 0):
        raise ConfigError(f"--bytes-per-token {args.bytes_per_token}: must be a positive number (validation bytes "
                          f"per token, about 2.44 for sp1024 and 3.73 for sp8192 on the challenge's validation set)")
    if args.json:
        check_output(args.json, force=args.force, what="JSON report", flag="--json")


def _log_files(item: str) -> list[Path]:
    p = Path(item)
    if p.is_dir():
        return sorted(p.glob("train_seed*.log")) or [q for q in [p / "train.log"] if q.is_file()]
    return [p] if p.is_file() and p.suffix != ".json" else []


def _check_distinct(a: Sequence[SeedScore], b: Sequence[SeedScore]) -> None:
    """MismatchError when one run is given twice (on one side or both, e.g. a run folder and its train.log): its
    seed would count double. A run is its folder and seed (its file when the seed is unknown)."""
    seen: dict[str, str] = {}
    for side, scores in (("RUN_A", a), ("--vs", b)):
        for s in scores:
            if s.line == "published number":
                continue
            path = Path(s.source).resolve()
            key = f"{path.parent}|{s.seed}" if s.seed is not None else str(path)
            if key in seen:
                raise MismatchError(f"{s.source} (seed {s.seed}) is given twice ({seen[key]} and {side}); each run "
                                    f"may appear once")
            seen[key] = side


__all__ = ["SeedScore", "SideStats", "RuleResult", "Comparison", "compare", "welch_rule", "welch_one_sided",
           "side_stats", "read_scores", "read_run_dir", "read_pack_dir", "read_submission_json", "read_log",
           "eval_lines", "log_seed", "implied_bytes_per_token", "format_comparison", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
