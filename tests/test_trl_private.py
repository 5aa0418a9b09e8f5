"""The private TRL / transformers names the package uses (dpo_pipeline/trl_private.py): each still where the pinned
versions have it, with the parameters the package relies on; the table names every one the package uses, and each
row's `used_in` really uses it. Fast: imports and source text, no model."""

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import trl

from dpo_pipeline import trl_private
from dpo_pipeline.trl_private import TABLE, Private, problems

PACKAGE = Path(trl_private.__file__).parent
# the library modules whose classes the package subclasses or patches: a private name of theirs used in the package
# must be in the table
LIBRARIES = ("trl.trainer.dpo_trainer", "trl.trainer.utils", "trl.trainer.callbacks", "transformers.trainer",
             "transformers.configuration_utils", "argparse")


def test_every_private_name_holds_in_the_pinned_versions():
    assert trl.__version__ == trl_private.PINNED_TRL
    found = problems()
    assert not found, "TRL/transformers changed what the package relies on:\n" + "\n".join(found)


def test_a_changed_name_signature_or_source_is_reported():
    changed = [
        Private("trl.DPOTrainer", "_precompute_ref_logps", "x", "y", params=("self", "dataset", "batch_size")),
        Private("trl.trainer.utils", "_no_such_global", "x", "y", kind=int),
        Private("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE", "x", "y", kind=str),
        Private("trl.DPOTrainer", "_metrics", "x", "y", source=("trl.DPOTrainer.__init__", "self._metrics = []")),
    ]
    found = problems(changed)
    assert len(found) == 4, found
    assert "parameters" in found[0] and "gone" in found[1] and "a int" in found[2] and "no longer contains" in found[3]


def test_the_packed_forward_returns_fields_that_trl_has():
    from trl.trainer.utils import FusedCausalLMOutput

    from dpo_pipeline.speed.packing import PACKED_FIELDS

    fields = {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    assert {*PACKED_FIELDS, "loss", "aux_loss"} <= fields


def _package_names() -> dict[str, set[str]]:
    """Underscore names the package touches (attributes, methods it defines, names it imports) -> its files,
    leaving out its own module-level functions, classes and constants."""
    names, own = {}, set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        own |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            name = (node.attr if isinstance(node, ast.Attribute) else node.name.split(".")[-1]
                    if isinstance(node, (ast.FunctionDef, ast.alias)) else "")
            if name.startswith("_") and not name.startswith("__"):
                names.setdefault(name, set()).add(str(path.relative_to(PACKAGE)))
    return {name: files for name, files in names.items() if name not in own}


def test_the_table_names_every_private_name_the_package_uses():
    theirs = set()
    for module in LIBRARIES:
        theirs |= set(re.findall(r"\b_\w+", inspect.getsource(importlib.import_module(module))))
    used = {name: files for name, files in _package_names().items() if name in theirs}
    listed = {row.name for row in TABLE}
    assert set(used) <= listed, f"private names used but not in trl_private.TABLE: {set(used) - listed}"


def test_each_row_is_used_where_it_says():
    for row in TABLE:
        for place in row.used_in.split(","):
            parts = place.split("(")[0].strip().split(".")
            module = PACKAGE.joinpath(*parts[:2]) if parts[0] == "speed" else PACKAGE / parts[0]
            assert row.name in module.with_suffix(".py").read_text(), (row.name, place)
