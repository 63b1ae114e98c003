"""A recipe: the whole two-stage distillation as one TOML file (``pretraining/recipes/*.toml``).

A recipe lists the model shapes, the stages (who teaches whom, from which start, with which
matches), and the settings of each job by the names of its script's flags: ``[distill]`` and
``[stand_in]`` hold ``pretraining/train.py`` settings (:class:`minirbt.pretrain_setup.DistillArguments`),
``[finetune]`` ``finetuning/run_classification.py`` settings. What a recipe does not set is the
script's default, so each default exists once, in the script's argument class. A recipe may
``extends = "other.toml"`` and write only what differs (tables are merged key by key).

Read by ``scripts/demo.py`` (:mod:`minirbt.pipeline`, every stage in-process) and by
``pretraining/train.py --recipe FILE --stage NAME`` (what ``pretraining/distill.sh`` runs, and
``python -m minirbt.recipe stages FILE`` lists the stages for it).
"""

from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from minirbt.textio import CorpusError, atomic_path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "pretraining" / "recipes"
# train.py flags a recipe may not set: where things are (given per run), and how a run treats its folder.
NOT_RECIPE = ("dataset", "output_dir", "teacher", "tokenizer", "student_init", "student_config", "resume",
              "overwrite_output", "accept_changed", "device", "students")
TEACHER = "teacher"  # the stages' name for the recipe's teacher (the given folder, or the demo's stand-in)


@dataclass
class Stage:
    """One distillation run: ``teacher`` (TEACHER or an earlier stage; None: MLM only) -> ``name``."""

    name: str
    title: str
    header: str | None = None
    teacher: str | None = None
    student_init: str | None = None  # the teacher assistant, [ta_init] name
    student_config: str | None = None  # a key of [models]
    matches: str | list[str] | None = None
    baseline: bool = False  # a comparison only: the demo runs it, distill.sh does not
    # Consecutive stages with the same one_pass name train together from one teacher pass (train.py --students):
    # same teacher, each its own student, matches and output folder, and the same weights as when run alone.
    one_pass: str | None = None


@dataclass
class Recipe:
    name: str
    path: Path
    max_seq_length: int
    segmenter: str
    ltp_epochs: int
    corpus: dict
    models: dict[str, str | dict]
    distill: dict
    ta_init: dict
    stages: list[Stage]
    finetune: dict
    stand_in: dict = field(default_factory=dict)
    compare: list[list[str]] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    global_batch: int | None = None
    ner: dict = field(default_factory=dict)  # the demo's NER column: sentences, models, run_ner.py settings
    deploy: dict = field(default_factory=dict)  # the demo's deployment rows: models (stages) to export and prune

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise CorpusError(f"{self.path}: no stage {name!r} (stages: {', '.join(s.name for s in self.stages)})")

    @property
    def ta_init_name(self) -> str:
        return self.ta_init.get("name", "ta_init")

    def model_config(self, key: str) -> dict:
        """A [models] entry as a config dict: a shipped config name, or fields over ``base``."""
        from minirbt.modeling import config_path

        spec = self.models[key]
        if isinstance(spec, str):
            return json.loads(config_path(spec).read_text())
        spec = dict(spec)
        base = json.loads(config_path(spec.pop("base")).read_text()) if "base" in spec else {}
        return base | spec


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file, or the name of a shipped one (quick, demo, minirbt)."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = RECIPES / f"{name_or_path}.toml"
    if not p.is_file():
        shipped = ", ".join(sorted(f.stem for f in RECIPES.glob("*.toml")))
        raise CorpusError(f"recipe not found: {name_or_path} (a .toml file, or one of {shipped})")
    return p


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise CorpusError(f"{path}: 'extends' loops back to itself")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise CorpusError(f"{path}: not valid TOML ({e})") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merge(_read(recipe_path(path.parent / parent), (*seen, path.resolve())), data)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and check a recipe: unknown keys, stages that name no model or no earlier stage, and flags the
    scripts do not have are refused, naming the file and the key."""
    path = recipe_path(name_or_path)
    data = _read(path)
    known = {f.name for f in fields(Recipe)} - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CorpusError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    missing = [f.name for f in fields(Recipe) if f.name in known and f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise CorpusError(f"{path}: missing key(s) {', '.join(missing)}")
    stage_keys = {f.name for f in fields(Stage)}
    stages = []
    for i, raw in enumerate(data.pop("stages")):
        bad = sorted(set(raw) - stage_keys)
        if bad:
            raise CorpusError(f"{path}: stages[{i}] has unknown key(s) {', '.join(bad)}")
        stages.append(Stage(**raw))
    recipe = Recipe(path=path, stages=stages, **data)
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    from minirbt.classification import ClassificationArguments
    from minirbt.pretrain_setup import DistillArguments

    train_flags = {f.name for f in fields(DistillArguments)} - set(NOT_RECIPE)
    for table in ("distill", "stand_in"):
        bad = sorted(set(getattr(r, table)) - train_flags)
        if bad:
            raise CorpusError(f"{r.path}: [{table}] {', '.join(bad)}: not a train.py setting a recipe may give "
                              f"(python pretraining/train.py --help)")
    ft_flags = {f.name for f in fields(ClassificationArguments)} - {"task", "model", "train_file", "dev_file",
                                                                   "output_dir", "test_file"}
    bad = sorted(set(r.finetune) - ft_flags - {"learning_rates"})
    if bad:
        raise CorpusError(f"{r.path}: [finetune] {', '.join(bad)}: not a run_classification.py setting")
    if r.ner:
        from minirbt.ner import NERArguments

        ner_flags = {f.name for f in fields(NERArguments)} - {"task", "model", "train_file", "dev_file",
                                                             "output_dir", "test_file", "resume"}
        bad = sorted(set(r.ner) - ner_flags - {"sentences", "models"})
        if bad:
            raise CorpusError(f"{r.path}: [ner] {', '.join(bad)}: not a run_ner.py setting")
        if set(r.ner.get("sentences", {})) != {"train", "dev", "test"}:
            raise CorpusError(f"{r.path}: [ner] sentences must give train, dev and test")
    done = {TEACHER, r.ta_init_name}
    for s in r.stages:
        if s.teacher is not None and s.teacher not in done:
            raise CorpusError(f"{r.path}: stage {s.name!r}: teacher {s.teacher!r} is neither {TEACHER!r} nor an "
                              f"earlier stage")
        if (s.student_init is None) == (s.student_config is None):
            raise CorpusError(f"{r.path}: stage {s.name!r}: give exactly one of student_init or student_config")
        if s.student_init is not None and s.student_init not in done:
            raise CorpusError(f"{r.path}: stage {s.name!r}: student_init {s.student_init!r} is neither "
                              f"{r.ta_init_name!r} nor an earlier stage")
        if s.student_config is not None and s.student_config not in r.models:
            raise CorpusError(f"{r.path}: stage {s.name!r}: student_config {s.student_config!r} is not in "
                              f"[models] ({', '.join(r.models)})")
        if s.teacher is None and s.matches:
            raise CorpusError(f"{r.path}: stage {s.name!r}: matches need a teacher")
        done.add(s.name)
    unknown = sorted(set(r.ner.get("models", [])) - done - {"teacher_random"})
    if unknown:
        raise CorpusError(f"{r.path}: [ner] models {', '.join(unknown)}: not a stage of the recipe")
    unknown = sorted(set(r.deploy.get("models", [])) - done - {"teacher_random"})
    if unknown or (r.deploy and set(r.deploy) != {"models"}):
        raise CorpusError(f"{r.path}: [deploy] takes models = [stage names] only (got {sorted(r.deploy)}; "
                          f"unknown models: {', '.join(unknown) or 'none'})")
    _check_passes(r)
    for pair in r.compare:
        if len(pair) != 3 or not {pair[0], pair[1]} <= done:
            raise CorpusError(f"{r.path}: compare entry {pair!r}: expected [stage, stage, what]")


def _check_passes(r: Recipe) -> None:
    seen: set[str] = set()
    for group in stage_groups(r):
        name = group[0].one_pass
        if name is None:
            continue
        members = [s.name for s in group]
        if name in seen:
            raise CorpusError(f"{r.path}: the stages of one_pass {name!r} must be consecutive")
        seen.add(name)
        for s in group:
            if s.teacher != group[0].teacher:
                raise CorpusError(f"{r.path}: one_pass {name!r}: its stages must have one teacher ({group[0].name}: "
                                  f"{group[0].teacher!r}, {s.name}: {s.teacher!r})")
            if s.teacher in members or s.student_init in members:
                raise CorpusError(f"{r.path}: one_pass {name!r}: stage {s.name!r} starts from another stage of the "
                                  f"same pass ({s.teacher if s.teacher in members else s.student_init!r})")


def stage_groups(r: Recipe) -> list[list[Stage]]:
    """The stages in order, consecutive stages of one ``one_pass`` name grouped (a stage without one: alone)."""
    groups: list[list[Stage]] = []
    for s in r.stages:
        if groups and s.one_pass is not None and groups[-1][-1].one_pass == s.one_pass:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def stage_matches(stage: Stage) -> list[str]:
    """The stage's matches as train.py's --matches list (preset names, a rule name or JSON)."""
    if stage.matches is None:
        return []
    return [stage.matches] if isinstance(stage.matches, str) else list(stage.matches)


def train_settings(recipe: Recipe, stage: Stage | None) -> dict:
    """The train.py settings the recipe gives a stage (None: the demo's teacher stand-in: [stand_in] over
    [distill], so that evaluation, checkpoints and logging follow [distill])."""
    if stage is None:
        return dict(recipe.distill) | dict(recipe.stand_in)
    return dict(recipe.distill) | ({"matches": stage_matches(stage)} if stage.matches else {})


def train_defaults(argv: list[str]) -> dict:
    """train.py's ``--recipe FILE --stage NAME``: that stage's settings, as the defaults of the other flags (so
    that flags given on the command line override them). No --recipe: none."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--stage")
    given, _ = pre.parse_known_args(argv)
    if given.recipe is None:
        if given.stage is not None:
            raise CorpusError("--stage needs --recipe (the recipe file it is a stage of)")
        return {}
    if given.stage is None:
        raise CorpusError(f"--recipe {given.recipe} needs --stage (one of its stages)")
    r = load_recipe(given.recipe)
    return train_settings(r, r.stage(given.stage))


# ------------------------------------------------------------------ for pretraining/distill.sh
def _shipped(r: Recipe, key: str) -> str:
    spec = r.models.get(key)
    if not isinstance(spec, str):
        raise CorpusError(f"{r.path}: [models] {key} must be a shipped config name for distill.sh")
    return spec


def shell_plan(r: Recipe) -> list[str]:
    """What pretraining/distill.sh reads from a recipe, one fact per line: ``global_batch N``, ``ta_init NAME
    CONFIG LAYER_MAP``, then ``stage NAME TEACHER --student_init|--student_config STUDENT`` for every stage that
    is not a baseline, or ``pass NAME TEACHER STAGE,STAGE,...`` for stages trained from one teacher pass (their
    ``--students`` file: :func:`students_file`). Model shapes must be shipped config names there."""
    lines = [f"global_batch {r.global_batch or ''}".rstrip(),
             f"ta_init {r.ta_init_name} {_shipped(r, 'ta')} {r.ta_init.get('layer_map', 'uniform')}"]
    for group in stage_groups(r):
        group = [s for s in group if not s.baseline]
        if len(group) > 1:
            lines.append(f"pass {group[0].one_pass} {group[0].teacher or '-'} {','.join(s.name for s in group)}")
        elif group:
            s = group[0]
            student = f"--student_init {s.student_init}" if s.student_init else \
                f"--student_config {_shipped(r, s.student_config)}"
            lines.append(f"stage {s.name} {s.teacher or '-'} {student}")
    return lines


def students_file(r: Recipe, pass_name: str, out: Path, path: Path) -> None:
    """distill.sh's ``--students`` file for one pass: each (non-baseline) stage's output folder under ``out``,
    its student (a shipped config, or an earlier stage's folder) and its matches."""
    group = [s for g in stage_groups(r) for s in g if s.one_pass == pass_name and not s.baseline]
    if not group:
        raise CorpusError(f"{r.path}: no stage has one_pass = {pass_name!r}")
    entries = []
    for s in group:
        student = {"student_init": str(out / s.student_init)} if s.student_init else \
            {"student_config": _shipped(r, s.student_config)}
        entries.append({"output_dir": str(out / s.name), **student, "matches": stage_matches(s)})
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from minirbt.cli import run

    def main() -> None:
        if len(sys.argv) == 3 and sys.argv[1] == "stages":
            print("\n".join(shell_plan(load_recipe(sys.argv[2]))))
        elif len(sys.argv) == 6 and sys.argv[1] == "students":
            students_file(load_recipe(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
        else:
            raise CorpusError("usage: python -m minirbt.recipe stages RECIPE | students RECIPE PASS OUT FILE")

    run(main)
