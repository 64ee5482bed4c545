"""Task specs: the strings that name an evaluation, on the command line and in `[eval] tasks`.

    ppl:PATH[:name=N][:stride=S]                       perplexity and bits/byte of PATH: a text file, a
                                                       directory or glob of text (or JSONL) files, or a
                                                       prepared data_prep directory (its val split)
    mc:FILE.jsonl[:name=N][:context=F][:endings=F][:label=F][:delimiter=D]
                                                       multiple choice; the options rename the fields;
                                                       delimiter joins context and ending (default one
                                                       space, the harness's; `delimiter=` for none, as code
                                                       whose context ends in a newline needs)

A task's name (its results' key, `eval/NAME/acc` in training metrics) is the file's stem unless `name=` says
otherwise. Parsing needs nothing but the string (config validation calls it); reading the files is tasks.py's.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from lm.config.schema import ConfigError

OPTIONS = {"ppl": ("name", "stride"), "mc": ("name", "context", "endings", "label", "delimiter")}
MC_FIELDS = {"context": "context", "endings": "endings", "label": "label"}  # defaults of the mc field options
_OPTION = re.compile(r"[a-z_]+=.*")
_NAME = re.compile(r"[\w.-]+")
_GLOB = set("*?[")
USAGE = "expected ppl:PATH or mc:FILE.jsonl, with options as :key=value (e.g. mc:arc.jsonl:label=answerKey)"


@dataclass(frozen=True)
class TaskSpec:
    text: str  # as written
    kind: str  # "ppl" or "mc"
    path: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.options.get("name") or default_name(self.path) or self.kind

    @property
    def stride(self) -> int | None:
        return int(self.options["stride"]) if "stride" in self.options else None

    @property
    def delimiter(self) -> str:
        return self.options.get("delimiter", " ")

    def field(self, key: str) -> str:
        """The JSONL field an mc task reads for `key` (context, endings, label)."""
        return self.options.get(key, MC_FIELDS[key])


def default_name(path: str) -> str:
    """The last path component without glob characters, without its suffix: data/arc_easy.jsonl -> arc_easy,
    texts/**/*.txt -> texts."""
    parts = [p for p in Path(path).parts if not _GLOB & set(p) and p not in ("/", ".", "..")]
    if not parts:
        return ""
    name = Path(parts[-1]).name
    for suffix in (".gz", ".zst", ".jsonl", ".json", ".txt", ".md"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^\w.-]+", "_", name).strip("_")


def parse_task(text: str) -> TaskSpec:
    """`KIND:PATH[:key=value ...]` -> TaskSpec; a ConfigError names the spec and what is wrong."""
    kind, _, rest = text.partition(":")
    if kind not in OPTIONS or not rest:
        raise ConfigError(f"task '{text}': {USAGE}")
    parts = rest.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and _OPTION.fullmatch(parts[-1]):
        key, value = parts.pop().split("=", 1)
        if key not in OPTIONS[kind]:
            match = difflib.get_close_matches(key, OPTIONS[kind], n=1, cutoff=0.0)
            raise ConfigError(f"task '{text}': unknown option '{key}' for {kind} tasks (options: "
                              f"{', '.join(OPTIONS[kind])}){f'; did you mean {match[0]!r}?' if match else ''}")
        if key in options:
            raise ConfigError(f"task '{text}': option '{key}' given twice")
        if not value and key != "delimiter":  # an empty delimiter is a choice (none)
            raise ConfigError(f"task '{text}': option '{key}' is empty")
        options[key] = value
    path = ":".join(parts)
    if not path:
        raise ConfigError(f"task '{text}': no path; {USAGE}")
    if "stride" in options and not (options["stride"].isdigit() and int(options["stride"]) > 0):
        raise ConfigError(f"task '{text}': stride '{options['stride']}' must be a positive whole number of tokens")
    if "name" in options and not _NAME.fullmatch(options["name"]):
        raise ConfigError(f"task '{text}': name '{options['name']}' may hold only letters, digits, '_', '.' and '-'")
    return TaskSpec(text, kind, path, options)


def parse_tasks(texts) -> list[TaskSpec]:
    """Several specs; their names must differ (each names its results)."""
    specs = [parse_task(t) for t in texts]
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"tasks '{seen[s.name]}' and '{s.text}' are both named '{s.name}'; "
                              "give one another name with :name=NAME")
        seen[s.name] = s.text
    return specs


def split_task_list(text: str) -> list[str]:
    """The command line's comma-separated list: `ppl:a.txt,mc:b.jsonl`."""
    return [t.strip() for t in text.split(",") if t.strip()]
