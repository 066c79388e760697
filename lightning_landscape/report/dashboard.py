"""A W&B workspace built from the keys the callbacks declare: one section per analysis, the right panel per key.

Every callback declares what it logs as a :class:`~lightning_landscape.report.logged.Logged` (``logged`` class
attribute): ``fnmatch`` patterns of
its key names, by panel kind (scalars -> line plots, media -> media browsers, tables -> table panels). The
dashboard is built from these declarations only, so a new measure cannot be forgotten: the test of this module
runs the quickstart and checks that every key it logged has a panel, and nothing else does.

* :func:`dashboard_spec` -> a plain JSON-able specification: sections ``<prefix>-<analysis>``, panels with their
  keys. Given the keys a run logged (:func:`run_keys` reads them from an offline W&B run), one panel per logged key;
  without, one panel per declared pattern (line plots by regular expression).
* :func:`workspace` -> a ``wandb_workspaces`` ``Workspace`` of that specification (the optional extra
  ``lightning-landscape[dashboard]``), which ``.save()`` uploads.
* ``lightning-landscape dashboard --entity E --project P [--run-filter REGEX] [--from-run DIR] [--offline]``
  builds and saves it; without network access (or with ``--offline``) it writes the specification as JSON and
  says how to upload it later (``--spec FILE``).

``lambda_max`` gets the optimizer's stability limit (``stability_limit``, ``2/lr`` for plain SGD) on the same plot,
so the edge of stability reads off directly.

Example::

    >>> spec = dashboard_spec(["landscape-flatness/lambda_max", "landscape-flatness/stability_limit",
    ...                        "landscape-flatness/spectral_density", "train/loss"])
    >>> [(s["name"], [p["kind"] for p in s["panels"]]) for s in spec["sections"]]
    [('landscape-flatness', ['line', 'media'])]
    >>> spec["sections"][0]["panels"][0]["keys"]
    ['landscape-flatness/lambda_max', 'landscape-flatness/stability_limit']
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_landscape.callbacks import declarations as callback_declarations
from lightning_landscape.report.logged import Logged
from lightning_landscape.report.reporter import section

#: scalars plotted on the same line plot as another key (the first), when both are logged
COMPANIONS = {"flatness": {"lambda_max": ["stability_limit"]}}


def _panels(analysis: str, logged: Logged, names: list[str] | None) -> list[dict[str, Any]]:
    """The panels of one section: for the logged key ``names`` (below the section), or for every pattern."""
    panels: list[dict[str, Any]] = []
    companions = COMPANIONS.get(analysis, {})
    if names is None:  # from the declaration alone
        shown = {c for extra in companions.values() for c in extra}
        for kind, patterns in (("line", logged.scalars), ("media", logged.media), ("table", logged.tables)):
            for p in patterns:
                if any(c in p for c in "*?["):
                    if kind == "line":  # media and tables have fixed names
                        panels.append({"kind": "line", "title": p, "regex": fnmatch.translate(p)})
                elif p not in shown:
                    panels.append({"kind": kind, "title": p, "names": [p, *companions.get(p, [])]})
        return panels
    shown = {c for name in names for c in companions.get(name, [])}
    placed: set[str] = set()
    for kind, patterns in (("line", logged.scalars), ("media", logged.media), ("table", logged.tables)):
        for p in patterns:  # in the order of the declaration: the main measures first
            for name in names:
                if name in placed or not fnmatch.fnmatchcase(name, p) or (kind == "line" and name in shown):
                    continue
                placed.add(name)
                extra = [c for c in companions.get(name, []) if c in names]
                panels.append({"kind": kind, "title": name, "names": [name, *extra]})
    return panels


def dashboard_spec(
    keys: Iterable[str] | None = None,
    prefix: str = "landscape",
    declarations: Sequence[tuple[str, Logged]] | None = None,
) -> dict[str, Any]:
    """The workspace specification: ``{"prefix", "sections": [{"name", "panels": [{"kind", "title", "keys" or
    "regex"}]}], "undeclared"}``.

    Args:
        keys: the keys a run logged (e.g. :func:`run_keys`); the user's own keys are ignored. None: a panel per
            declared pattern.
        prefix: the callbacks' ``key_prefix``.
        declarations: ``(section, what it logs)`` per analysis, in the dashboard's order; default: our four
            callbacks' (:func:`~lightning_landscape.callbacks.declarations`).

    ``undeclared`` lists keys of our sections that no declaration covers (a callback that logs a key it did not
    declare): they get no panel.
    """
    keys = None if keys is None else sorted(set(keys))
    sections, undeclared = [], []
    for analysis, logged in declarations if declarations is not None else callback_declarations():
        name = section(prefix, analysis)
        names = None if keys is None else [k[len(name) + 1 :] for k in keys if k.startswith(name + "/")]
        panels = _panels(analysis, logged, names)
        for panel in panels:
            if "names" in panel:
                panel["keys"] = [f"{name}/{n}" for n in panel.pop("names")]
            else:
                panel["regex"] = re.escape(name + "/") + panel["regex"]
        if names is not None:
            undeclared += [f"{name}/{n}" for n in names if logged.kind(n) is None]
        if panels:
            sections.append({"name": name, "panels": panels})
    return {"prefix": prefix, "sections": sections, "undeclared": undeclared}


def _records(path: Path) -> Iterable[bytes]:
    """The records of a W&B transaction log (``.wandb``): LevelDB's log format after a 7-byte header, blocks of
    32 KiB, each record a 7-byte header (CRC32, length, type: full, first, middle, last) and its bytes."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{str(path)!r} is not a W&B run log (no ':W&B' header).")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding: the end of what was written
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def run_keys(run: str | Path) -> set[str]:
    """Every key logged to an offline W&B run: ``run`` is its folder (``wandb/offline-run-*``), its ``.wandb``
    file, or a folder below which exactly one offline run lies (e.g. the logger's ``save_dir``)."""
    from wandb.proto import wandb_internal_pb2

    path = Path(run)
    if path.is_dir():
        files = sorted(path.glob("*.wandb")) or sorted(path.glob("**/offline-run-*/*.wandb"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"--from-run {str(run)!r}: expected one offline W&B run below it, found {len(files)}."
                " HINT: pass the run's folder, e.g. runs/quickstart/wandb/offline-run-<date>-<id>."
            )
        path = files[0]
    keys: set[str] = set()
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            # a media value (image, table, plotly) arrives as its fields under the key: nested_key[0] is the key
            keys |= {item.key or item.nested_key[0] for item in record.history.item}
    return {k for k in keys if not k.startswith("_")}


def workspace(spec: dict[str, Any], entity: str, project: str, name: str = "lightning-landscape", run_filter=None):
    """The ``wandb_workspaces.workspaces.Workspace`` of ``spec`` (``run_filter``: a regular expression over run
    names, the runs table's search). Needs the extra ``lightning-landscape[dashboard]``."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError(
            "The dashboard needs wandb-workspaces. HINT: pip install 'lightning-landscape[dashboard]'."
        ) from err

    def panel(p: dict[str, Any]) -> Any:
        if p["kind"] == "line":
            if "regex" in p:
                return wr.LinePlot(title=p["title"], metric_regex=p["regex"])
            return wr.LinePlot(title=p["title"], y=list(p["keys"]))
        if p["kind"] == "media":
            return wr.MediaBrowser(title=p["title"], media_keys=list(p["keys"]))
        return wr.WeavePanelSummaryTable(table_name=p["keys"][0])

    sections = [
        ws.Section(name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=True) for s in spec["sections"]
    ]
    runsets = ws.RunsetSettings(query=run_filter, regex_query=True) if run_filter else ws.RunsetSettings()
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=runsets)


def main(args: list[str]) -> dict[str, Any]:
    """``lightning-landscape dashboard ...`` (see the module docstring); returns the specification."""
    from lightning_landscape.checks import OneLineParser

    parser = OneLineParser(prog="lightning-landscape dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project")
    parser.add_argument("--name", default="lightning-landscape", help="the saved workspace's name")
    parser.add_argument("--run-filter", default=None, help="regular expression over run names")
    parser.add_argument("--prefix", default="landscape", help="the callbacks' key_prefix")
    parser.add_argument("--from-run", default=None, help="an offline W&B run: one panel per key it logged")
    parser.add_argument("--spec", default=None, help="a specification written before: build and upload it")
    parser.add_argument("--out", default="landscape-dashboard.json", help="where the specification is written")
    parser.add_argument("--offline", action="store_true", help="only write the specification")
    opts = parser.parse_args(args)
    if opts.spec:
        spec = json.loads(Path(opts.spec).read_text())
    else:
        spec = dashboard_spec(run_keys(opts.from_run) if opts.from_run else None, opts.prefix)
    for key in spec.get("undeclared", []):
        print(f"lightning-landscape dashboard: {key} is logged but no callback declares it; it gets no panel.")
    view = workspace(spec, opts.entity, opts.project, opts.name, opts.run_filter)
    if not opts.offline:
        try:
            view.save()
            print(f"lightning-landscape dashboard: saved the workspace {opts.name!r} to {opts.entity}/{opts.project}.")
            return spec
        except Exception as err:  # no network, no login: the specification is kept for later
            print(f"lightning-landscape dashboard: W&B not reachable ({type(err).__name__}: {err}).")
    Path(opts.out).write_text(json.dumps(spec, indent=1))
    print(
        f"lightning-landscape dashboard: wrote the workspace specification to {opts.out}"
        f" ({sum(len(s['panels']) for s in spec['sections'])} panels in {len(spec['sections'])} sections). Upload it"
        f" later with: lightning-landscape dashboard --entity {opts.entity} --project {opts.project} --spec {opts.out}"
    )
    return spec
