"""``trellis completion bash|zsh|fish``: a shell completion script, written from the parser.

The script is generated from the same argparse tree that parses the command line, so a
new subcommand or flag completes as soon as it exists. Each shell gets a static table
(command path → subcommands and flags; flag → its choices) and a small function that walks
the words typed so far to find the path: no Python runs at each <TAB>, which matters when
``trellis`` takes a second to import grpc and kopf.

Install::

    trellis completion bash > /etc/bash_completion.d/trellis   # or source <(...) in ~/.bashrc
    trellis completion zsh > "${fpath[1]}/_trellis"
    trellis completion fish > ~/.config/fish/completions/trellis.fish
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Node", "register", "render", "walk"]

SHELLS = ("bash", "zsh", "fish")


@dataclass(frozen=True)
class Node:
    """One parser of the tree: ``path`` is ``("trellis", "ca", "serve")``."""

    path: tuple[str, ...]
    subcommands: tuple[str, ...]
    flags: tuple[str, ...]
    # Flags that take a value, with their choices (empty: any value, e.g. a file).
    valued: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def key(self) -> str:
        return " ".join(self.path)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("trellis",)) -> Iterator[Node]:
    """Every parser under ``parser``, depth first, the parser itself first."""
    subcommands: dict[str, argparse.ArgumentParser] = {}
    flags: list[str] = []
    valued: list[tuple[str, tuple[str, ...]]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands.update(action.choices)
            continue
        flags.extend(action.option_strings)
        if action.option_strings and action.nargs != 0:
            choices = tuple(str(c) for c in action.choices) if action.choices else ()
            valued.extend((flag, choices) for flag in action.option_strings)
    yield Node(path, tuple(subcommands), tuple(flags), tuple(valued))
    for name, child in subcommands.items():
        yield from walk(child, (*path, name))


def _q(text: str) -> str:
    return shlex.quote(text)


def _tables(nodes: list[Node], declare: str, *, pairs: bool = False) -> list[str]:
    """The three associative arrays; ``pairs`` writes ``( key value ... )``, the form zsh
    reads (bash wants ``( [key]=value ... )``)."""

    def item(key: str, value: str) -> str:
        return f"  {_q(key)} {_q(value)}" if pairs else f"  [{_q(key)}]={_q(value)}"

    lines = [f"{declare} _trellis_words _trellis_valued _trellis_choices"]
    lines.append("_trellis_words=(")
    lines.extend(item(n.key, " ".join(n.subcommands + n.flags)) for n in nodes)
    lines.append(")")
    lines.append("_trellis_valued=(")
    # Padded with spaces so that a lookup of " --dir " cannot match "--dir-mode".
    lines.extend(item(n.key, " " + " ".join(f for f, _ in n.valued) + " ") for n in nodes)
    lines.append(")")
    lines.append("_trellis_choices=(")
    for node in nodes:
        for flag, choices in node.valued:
            if choices:
                lines.append(item(f"{node.key} {flag}", " ".join(choices)))
    lines.append(")")
    return lines


# The walk over the typed words is the same in bash and zsh: skip flags (and the value of
# a flag that takes one), descend into a word only when it names a subcommand of the path.
_BASH = """
_trellis() {
  local cur="${COMP_WORDS[COMP_CWORD]}" node="trellis" word i skip=0
  for ((i = 1; i < COMP_CWORD; i++)); do
    word="${COMP_WORDS[i]}"
    if ((skip)); then skip=0; continue; fi
    if [[ "$word" == -* ]]; then
      [[ "$word" != *=* && "${_trellis_valued[$node]}" == *" $word "* ]] && skip=1
      continue
    fi
    [[ -n "${_trellis_words["$node $word"]+set}" ]] && node="$node $word"
  done
  if ((skip)); then
    local key="$node ${COMP_WORDS[COMP_CWORD-1]}"
    if [[ -n "${_trellis_choices[$key]+set}" ]]; then
      COMPREPLY=($(compgen -W "${_trellis_choices[$key]}" -- "$cur"))
    else
      COMPREPLY=()  # a path, an address, a number: readline's default (-o default)
    fi
    return 0
  fi
  COMPREPLY=($(compgen -W "${_trellis_words[$node]}" -- "$cur"))
}
complete -o default -F _trellis trellis
"""

_ZSH = """
_trellis() {
  local node="trellis" word i skip=0
  for ((i = 2; i < CURRENT; i++)); do
    word="${words[i]}"
    if ((skip)); then skip=0; continue; fi
    if [[ "$word" == -* ]]; then
      [[ "$word" != *=* && "${_trellis_valued[$node]}" == *" $word "* ]] && skip=1
      continue
    fi
    (( ${+_trellis_words[$node $word]} )) && node="$node $word"
  done
  if ((skip)); then
    local key="$node ${words[CURRENT-1]}"
    if (( ${+_trellis_choices[$key]} )); then
      compadd -- ${=_trellis_choices[$key]}
    else
      _files
    fi
    return
  fi
  compadd -- ${=_trellis_words[$node]}
}
if [[ "$funcstack[1]" == _trellis ]]; then
  _trellis "$@"
else
  compdef _trellis trellis
fi
"""

_FISH_NODE = """
function __trellis_node --description 'the trellis subcommand typed so far'
    set -l node trellis
    set -l skip 0
    for word in (commandline -opc)[2..-1]
        if test $skip -eq 1
            set skip 0
            continue
        end
        if string match -q -- '-*' $word
            if not string match -q -- '*=*' $word; and contains -- "$node $word" $__trellis_valued
                set skip 1
            end
            continue
        end
        if contains -- "$node $word" $__trellis_nodes
            set node "$node $word"
        end
    end
    echo $node
end
"""


def _bash(nodes: list[Node]) -> str:
    header = "# bash completion for trellis (trellis completion bash)"
    return "\n".join([header, *_tables(nodes, "declare -gA")]) + "\n" + _BASH


def _zsh(nodes: list[Node]) -> str:
    header = "#compdef trellis\n# zsh completion for trellis (trellis completion zsh)"
    return "\n".join([header, *_tables(nodes, "typeset -gA", pairs=True)]) + "\n" + _ZSH


def _fish(nodes: list[Node]) -> str:
    lines = ["# fish completion for trellis (trellis completion fish)"]
    lines.append("set -g __trellis_nodes " + " ".join(_q(n.key) for n in nodes))
    valued = [f"{n.key} {flag}" for n in nodes for flag, _ in n.valued]
    lines.append("set -g __trellis_valued " + " ".join(_q(v) for v in valued))
    lines.append(_FISH_NODE)
    lines.append("complete -c trellis -f")
    for node in nodes:
        when = _q(f'test (__trellis_node) = "{node.key}"')
        if node.subcommands:
            words = _q(" ".join(node.subcommands))
            lines.append(f"complete -c trellis -n {when} -a {words}")
        choices = dict(node.valued)
        for flag in node.flags:
            spec = f"-l {_q(flag[2:])}" if flag.startswith("--") else f"-s {_q(flag[1:])}"
            if flag not in choices:
                lines.append(f"complete -c trellis -n {when} {spec}")
            elif choices[flag]:
                words = _q(" ".join(choices[flag]))
                lines.append(f"complete -c trellis -n {when} {spec} -x -a {words}")
            else:
                lines.append(f"complete -c trellis -n {when} {spec} -r -F")
    return "\n".join(lines) + "\n"


def render(shell: str, parser: argparse.ArgumentParser) -> str:
    nodes = list(walk(parser))
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](nodes)


def register(commands: Any) -> None:
    p = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for SHELL on stdout. bash: add"
        " `source <(trellis completion bash)` to ~/.bashrc; zsh: write it to a file named"
        " _trellis in $fpath; fish: write it to ~/.config/fish/completions/trellis.fish.",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    p.set_defaults(handler=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from trellis.cli import build_parser

    print(render(args.shell, build_parser()), end="")
    return 0
