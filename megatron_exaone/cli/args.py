"""The command line shared by `exaone-train` and `exaone-eval`: Hydra overrides, plus the flags a
user of a Hydra app expects (`--cfg`, `--info`, `--help`, `--config-dir`). The commands compose
their recipes with Hydra's compose API rather than `@hydra.main`, so these flags are handled here:
each prints and exits 0 without training; a bad flag or override exits 2 with one line.
"""

from __future__ import annotations

import dataclasses
import textwrap

from hydra.core.default_element import (
    DefaultsTreeNode,
    GroupDefault,
    InputDefault,
    ResultDefault,
)
from omegaconf import DictConfig, OmegaConf

from megatron_exaone.config import load
from megatron_exaone.config.schema import RecipeError
from megatron_exaone.errors import UserError, reported

CFG_TYPES = ("job", "hydra", "all")
INFO_TYPES = ("all", "config", "defaults", "defaults-tree", "searchpath")

FLAGS = """\
== Flags ==
  --cfg, -c job|hydra|all     print the composed configuration as YAML and exit: the
                              training config, Hydra's own node, or both
  --resolve                   with --cfg: resolve interpolations
  --package, -p PKG           with --cfg: print only that node (e.g. parallel, trainer)
  --info [all|config|defaults|defaults-tree|searchpath]
                              print the recipes search path, the defaults list and tree
                              (the recipe chosen per group) and the composed config; exit
  --config-dir, -cd DIR       the recipes directory (default: $MEGATRON_EXAONE_RECIPES or recipes/)
  --help, -h                  this help
  --hydra-help                these flags only
"""

OVERRIDES = """\
== Overrides ==
  group=option    pick a group's recipe (experiment=cpu_tiny, precision=fp8_torch)
  key=value       set a value (parallel.tp=2, trainer.max_steps=10, run_dir=runs/x)
  +key=value      add a key the recipes do not set (a model field, a new map entry)
Every key is checked against the schema (megatron_exaone/config/schema.py).
"""

# flag -> the `_Request` field its value goes to
_VALUED = {"--config-dir": "config_dir", "-cd": "config_dir", "--cfg": "cfg", "-c": "cfg"}
_VALUED |= {"--package": "package", "-p": "package"}
_SWITCHES = {"--resolve": "resolve", "--help": "help", "-h": "help", "--hydra-help": "hydra_help"}


@dataclasses.dataclass
class _Request:
    overrides: list[str] = dataclasses.field(default_factory=list)
    config_dir: str | None = None
    cfg: str | None = None
    package: str | None = None
    resolve: bool = False
    info: str | None = None
    help: bool = False
    hydra_help: bool = False


def parse_command_line(argv: list[str], program: str, doc: str) -> tuple[list[str], str | None]:
    """(overrides, config_dir) from a Hydra-style command line. `--cfg`, `--info`, `--help` and
    `--hydra-help` are answered here (`doc`, the command's docstring, heads the help) and end with
    SystemExit(0); a bad flag or override prints `program: message` and raises SystemExit(2)."""
    with reported(program):
        request = _parse(argv)
        if request.help:
            _print_help(request, doc)
        elif request.hydra_help:
            print(FLAGS, end="")
        elif request.cfg:
            _print_cfg(request)
        elif request.info:
            _print_info(request)
        else:
            return request.overrides, request.config_dir
    raise SystemExit(0)


# ------------------------------------------------------------------------------------------ parsing
def _parse(argv: list[str]) -> _Request:
    request, i = _Request(), 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("-"):  # overrides never start with '-' ('~key' deletes)
            request.overrides.append(arg)
            continue
        flag, has_value, value = arg.partition("=")
        if flag in _VALUED:
            if not has_value:
                if i == len(argv):
                    raise UserError(f"{flag} needs a value (see --help).")
                value, i = argv[i], i + 1
            setattr(request, _VALUED[flag], value)
        elif flag == "--info":
            # its value is optional: take the next word only when it names a section
            if not has_value and i < len(argv) and argv[i] in INFO_TYPES:
                value, i = argv[i], i + 1
            request.info = value or "all"
        elif arg in _SWITCHES:
            setattr(request, _SWITCHES[arg], True)
        else:
            raise UserError(
                f"unknown option {arg!r}. Supported: --cfg/-c, --resolve, --package/-p, --info, "
                "--config-dir/-cd, --help/-h, --hydra-help; everything else is a Hydra override "
                "(key=value, group=option, +key=value)."
            )
    _check(request)
    return request


def _check(request: _Request) -> None:
    if request.cfg is not None and request.cfg not in CFG_TYPES:
        raise UserError(f"--cfg {request.cfg}: use one of {', '.join(CFG_TYPES)}.")
    if request.info is not None and request.info not in INFO_TYPES:
        raise UserError(f"--info {request.info}: use one of {', '.join(INFO_TYPES)}.")
    if (request.resolve or request.package) and request.cfg is None:
        raise UserError("--resolve and --package only go with --cfg (e.g. --cfg job -p parallel).")


# ------------------------------------------------------------------------------------ --cfg, --info
def _print_cfg(request: _Request) -> None:
    job, hydra_node = load.compose_job(request.overrides, request.config_dir)
    if request.cfg == "job":
        config = job
    else:  # Hydra's node first, as Hydra prints it
        config = OmegaConf.create({"hydra": hydra_node, **(job if request.cfg == "all" else {})})
    if request.resolve:
        OmegaConf.resolve(config)  # in place: what cannot resolve yet (Hydra's ???) stays
    if request.package in (None, "_global_"):
        print(OmegaConf.to_yaml(config), end="")
        return
    absent = object()  # a node may be null
    node = OmegaConf.select(config, request.package, default=absent)
    if node is absent:
        raise RecipeError(
            f"--package {request.package}: no such node in the --cfg {request.cfg} config; its "
            f"top-level keys: {', '.join(map(str, config))}."
        )
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        print(f"# @package {request.package}\n{OmegaConf.to_yaml(node)}", end="")
    else:
        print(node)


def _print_info(request: _Request) -> None:
    # compose first: a bad override is reported before any section is printed
    job, hydra_node = load.compose_job(request.overrides, request.config_dir)
    section = request.info
    if section in ("all", "searchpath"):
        rows = [(s.provider, f"{s.schema}://{s.path}") for s in hydra_node.runtime.config_sources]
        _print_table("Config search path", ("Provider", "Search path"), rows)
    if section in ("all", "defaults-tree", "defaults"):
        defaults, tree = load.compose_defaults(request.overrides, request.config_dir)
        if section != "defaults":
            print("== Defaults tree ==")
            _print_tree(tree)
            print()
        if section != "defaults-tree":
            rows = [(d.config_path, d.package, d.parent) for d in defaults if not _of_hydra(d)]
            _print_table("Defaults list", ("Config path", "Package", "Parent"), rows)
    if section in ("all", "config"):
        print(f"== Config ==\n{OmegaConf.to_yaml(job)}", end="")


def _of_hydra(default: ResultDefault) -> bool:
    """Is a defaults-list entry Hydra's own configuration (shown by `--cfg hydra`)?"""
    return default.config_path.startswith("hydra/")


def _print_tree(node: DefaultsTreeNode | InputDefault, depth: int = 0) -> None:
    """The defaults tree, one config per line, indented under the config that listed it; Hydra's
    own subtree is left out."""
    if isinstance(node, DefaultsTreeNode):
        if node.node.get_config_path() == "hydra/config":
            return
        children = node.children or []
        print("  " * depth + _tree_label(node.node) + (":" if children else ""))
        for child in children:
            _print_tree(child, depth + 1)
    else:
        print("  " * depth + _tree_label(node))


def _tree_label(default: InputDefault) -> str:
    if isinstance(default, GroupDefault):
        return f"{default.get_override_key()}: {default.get_name() or 'null'}"
    return default.get_config_path()


def _print_table(title: str, header: tuple[str, ...], rows: list[tuple[str | None, ...]]) -> None:
    cells = [header, *[tuple(cell or "" for cell in row) for row in rows]]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    print(f"== {title} ==")
    for row in cells:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()


# ------------------------------------------------------------------------------------------- --help
def _print_help(request: _Request, doc: str) -> None:
    groups = load.recipe_groups(request.config_dir)
    _, hydra_node = load.compose_job(request.overrides, request.config_dir)
    choices = hydra_node.runtime.choices
    print(f"{doc.strip()}\n\n{FLAGS}")
    print("== Configuration groups ==")
    print(f"Recipes in {load.recipes_dir(request.config_dir)}: pick one per group with")
    print("group=option (* marks the current choice).")
    indent = max(map(len, groups), default=0) + 4
    for group, options in groups.items():
        listed = ", ".join(o + ("*" if o == choices.get(group) else "") for o in options)
        head = f"  {group}".ljust(indent)
        print(textwrap.fill(listed, 100, initial_indent=head, subsequent_indent=" " * indent))
    print(f"\n{OVERRIDES}", end="")
