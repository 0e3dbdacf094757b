"""Config inputs a deployment gives (ops hunt): a config from a pipe, blank paths, and
interfaces written as in ZeroMQ addresses."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from livemask.config import load_config, parse_config
from livemask.errors import ConfigError


def test_a_config_from_a_pipe_loads_with_paths_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve -c <(envsubst < t.yaml)``: before, "config file /dev/fd/63 does not exist"."""
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(
        target=fifo.write_text, args=("record:\n  path: recs\nmodel:\n  threads: 1\n",))
    writer.start()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(fifo)
    writer.join(5)
    assert cfg.model.threads == 1
    assert cfg.record.path == work / "recs"  # not beside the pipe


@pytest.mark.parametrize(("section", "key", "says"), [
    ("record", "path", "an empty path; it would record beside the YAML file"),
    ("model", "path", "an empty path; give your model card"),
    ("hardware", "config_file", "no file given"),
])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_path_is_refused(section: str, key: str, says: str, blank: str) -> None:
    """Before, ``record.path: ''`` recorded beside the config file without a word (and
    ``' '`` into a folder named " ")."""
    with pytest.raises(ConfigError, match=rf"(?s){section}\.{key}.*{re.escape(says)}"):
        parse_config({section: {key: blank}})


@pytest.mark.parametrize("section", ["metrics", "dashboard"])
def test_an_interface_may_be_bracketed_ipv6_but_not_a_url(section: str) -> None:
    """Before, ``[::1]`` (as the docs write IPv6 in ZeroMQ addresses) failed only when the
    port was bound ("Name or service not known")."""
    assert getattr(parse_config({section: {"address": "[::1]"}}), section).address == "::1"
    assert getattr(parse_config({section: {"address": "0.0.0.0"}}), section).address == (
        "0.0.0.0")
    with pytest.raises(ConfigError, match=rf"(?s){section}\.address.*without a scheme"):
        parse_config({section: {"address": "tcp://127.0.0.1"}})
    with pytest.raises(ConfigError, match=rf"{section}\.address"):
        parse_config({section: {"address": ""}})


def test_dev_stdin_redirected_from_a_file_takes_paths_from_that_files_folder(
    tmp_path: Path,
) -> None:
    """``-c /dev/stdin < conf/t.yaml``: relative paths as for ``-c conf/t.yaml`` (review:
    the first version took them from /dev, recording to /dev/recs)."""
    import subprocess
    import sys

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "t.yaml").write_text("record:\n  path: recs\n", encoding="utf-8")
    with (conf / "t.yaml").open("rb") as stdin:
        out = subprocess.run(
            [sys.executable, "-c", "from livemask.config import load_config; "
             "print(load_config('/dev/stdin').record.path)"],
            stdin=stdin, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == str(conf / "recs")


def test_an_interface_with_a_port_is_refused() -> None:
    with pytest.raises(ConfigError, match="without a scheme or port"):
        parse_config({"metrics": {"address": "127.0.0.1:80"}})


@pytest.mark.parametrize(("text", "where"), [
    ("feedback:\n  rules:\n    - name: on\n      when: {values: [{path: summary.count, gt: 1}]}"
     "\n      action: {stop: true}\n", "feedback.rules.0.name:"),
    ("feedback:\n  rules:\n    - name: r\n      use: 'x.y:z'\n      params: {on: {a: 1}}\n",
     "feedback.rules.0.params.true (a key):"),
])
def test_a_yaml_boolean_word_where_text_belongs_says_to_quote_it(
    tmp_path: Path, text: str, where: str
) -> None:
    """``name: on`` is YAML 1.1's true: before, "Input should be a valid string" (and a key
    ``on:`` was named ``1``), without saying why (controller hunt)."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert where in str(err.value)
    assert "as the boolean true; quote text (e.g. 'on'), or give a number" in str(err.value)


def test_a_linked_config_takes_paths_from_the_links_folder(tmp_path: Path) -> None:
    """As before the pipe support (review: a first version resolved links to their
    target's folder, moving recordings without a word)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "rig").mkdir()
    (tmp_path / "shared" / "live.yaml").write_text("record:\n  path: recs\n", encoding="utf-8")
    (tmp_path / "rig" / "live.yaml").symlink_to(tmp_path / "shared" / "live.yaml")
    assert load_config(tmp_path / "rig" / "live.yaml").record.path == tmp_path / "rig" / "recs"


def test_a_yaml_boolean_word_where_a_number_belongs_says_so_too(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("feedback:\n  rules:\n    - name: r\n      when: {values: [{path: "
                    "summary.count, gt: yes}]}\n      action: {stop: true}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"when\.values\.0\.gt: .*as the boolean true"):
        load_config(path)
