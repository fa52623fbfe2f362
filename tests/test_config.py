"""Config loading: defaults, configs/*.toml, --set overrides, type and value checks, round trips."""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from minedraft.common.config import (
    Config, ConfigError, ModelSection, SchedulerSection, WorkerSection, config_from_dict,
    config_to_dict, default_run_dir, format_config, load_config, resolve_config_path,
    resolve_run_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TOML = str(REPO_ROOT / "configs" / "tiny.toml")


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    config = load_config()
    assert config == Config()
    assert config.scheduler.mode == "auto" and config.scheduler.num_draft == 4
    assert config.drafter.cpu_cores == (0,) and config.verifier.cpu_cores == (1,)
    assert config.model.dtype == "float32" and config.server.endpoint == "tcp://127.0.0.1:7475"


def test_tiny_toml_loads_by_path_and_by_name(monkeypatch):
    config = load_config(TINY_TOML)
    assert config.scheduler.mode == "psd" and config.scheduler.max_batch == 8
    assert config.model.target.startswith("tiny-") and config.model.tiny_draft_noise > 0
    monkeypatch.chdir(tempfile.gettempdir())  # the name is found via the repo, not the cwd
    assert Path(resolve_config_path("tiny")).resolve() == Path(TINY_TOML).resolve()
    assert load_config("tiny") == config
    monkeypatch.chdir(REPO_ROOT)
    assert load_config("configs/tiny.toml") == config


def test_every_tiny_key_has_a_comment():
    for line in Path(TINY_TOML).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, line


def test_missing_config_names_known_ones():
    with pytest.raises(ConfigError, match="nope.*tiny"):
        resolve_config_path("nope")


def test_unknown_section_and_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'schedular'.*did you mean 'scheduler'"):
        load_config(write_toml(tmp_path, "[schedular]\nmode = 'sd'\n"))
    with pytest.raises(ConfigError, match="unknown key 'scheduler.num_drafts'.*'scheduler.num_draft'"):
        load_config(write_toml(tmp_path, "[scheduler]\nnum_drafts = 3\n"))
    with pytest.raises(ConfigError, match="unknown key 'model.zzz'"):
        load_config(overrides=["model.zzz=1"])
    with pytest.raises(ConfigError, match="--set: expected section.key=value"):
        load_config(overrides=["num_draft=3"])


def test_toml_values_override_defaults(tmp_path):
    config = load_config(write_toml(tmp_path, "[scheduler]\nmode = 'sd'\n[server]\nstartup_timeout_s = 5\n"))
    assert config.scheduler.mode == "sd" and config.scheduler.num_draft == 4
    assert config.server.startup_timeout_s == 5.0 and isinstance(config.server.startup_timeout_s, float)


def test_overrides_of_each_type():
    config = load_config(TINY_TOML, [
        "scheduler.num_draft=7",            # int
        "model.tiny_draft_noise=0.5",       # float
        "server.startup_timeout_s=3",       # int accepted for float
        "model.target=/models/qwen",        # str
        "scheduler.mode='sd'",              # quoted str
        "drafter.cpu_cores=2,3",            # tuple
        "verifier.cpu_cores=[4, 5]",        # tuple, TOML-like
    ])
    assert config.scheduler.num_draft == 7 and config.model.tiny_draft_noise == 0.5
    assert config.server.startup_timeout_s == 3.0 and isinstance(config.server.startup_timeout_s, float)
    assert config.model.target == "/models/qwen" and config.scheduler.mode == "sd"
    assert config.drafter.cpu_cores == (2, 3) and config.verifier.cpu_cores == (4, 5)
    assert load_config(overrides=["drafter.cpu_cores="]).drafter.cpu_cores == ()
    assert load_config(overrides=["drafter.cpu_cores=[]"]).drafter.cpu_cores == ()
    assert load_config(overrides=["scheduler.num_draft=2", "scheduler.num_draft=3"]).scheduler.num_draft == 3


@pytest.mark.parametrize("text, expected", [("true", True), ("1", True), ("Yes", True),
                                            ("false", False), ("0", False), ("no", False)])
def test_bool_override_words(text, expected):
    from minedraft.common.config import parse_text
    assert parse_text("x.y", bool, text) is expected
    with pytest.raises(ConfigError, match="x.y: expected bool, got 'maybe'"):
        parse_text("x.y", bool, "maybe")


@pytest.mark.parametrize("override, message", [
    ("scheduler.num_draft=abc", "scheduler.num_draft: expected int, got 'abc'"),
    ("scheduler.num_draft=2.5", "scheduler.num_draft: expected int, got '2.5'"),
    ("model.tiny_draft_noise=lots", "model.tiny_draft_noise: expected float, got 'lots'"),
    ("drafter.cpu_cores=0,x", "drafter.cpu_cores: expected list of int, got '0,x'"),
])
def test_override_type_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value) == message


@pytest.mark.parametrize("toml, message", [
    ("[scheduler]\nnum_draft = '4'", "scheduler.num_draft: expected int, got '4'"),
    ("[scheduler]\nnum_draft = true", "scheduler.num_draft: expected int, got True"),
    ("[scheduler]\nnum_draft = 4.0", "scheduler.num_draft: expected int, got 4.0"),
    ("[server]\nstartup_timeout_s = false", "server.startup_timeout_s: expected float, got False"),
    ("[model]\ntarget = 3", "model.target: expected str, got 3"),
    ("[drafter]\ncpu_cores = 0", "drafter.cpu_cores: expected list of int, got 0"),
    ("[drafter]\ncpu_cores = [0, 'a']", "drafter.cpu_cores: expected list of int"),
    ("scheduler = 3", "scheduler: expected a table, got 3"),
])
def test_toml_type_errors(tmp_path, toml, message):
    with pytest.raises(ConfigError) as info:
        load_config(write_toml(tmp_path, toml))
    assert str(info.value).startswith(message)


def test_bad_toml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(write_toml(tmp_path, "[scheduler\n"))


@pytest.mark.parametrize("override, message", [
    ("scheduler.mode=fast", "scheduler.mode: expected auto, psd, sd or ar"),
    ("model.dtype=float16", "model.dtype: expected float32 or bfloat16"),
    ("scheduler.num_draft=0", "scheduler.num_draft: must be in 1..16"),
    ("scheduler.num_draft=17", "scheduler.num_draft: must be in 1..16"),
    ("scheduler.extra_draft=-1", "scheduler.extra_draft: must be in 0..16"),
    ("scheduler.extra_draft=17", "scheduler.extra_draft: must be in 0..16"),
    ("scheduler.draft_policy=auto", "scheduler.draft_policy: expected fixed or adaptive"),
    ("scheduler.max_batch=-1", "scheduler.max_batch: must be >= 0"),
    ("scheduler.kv_cache_memory=0", "scheduler.kv_cache_memory: must be in"),
    ("scheduler.max_len=8", "scheduler.max_len: must be >= 16"),
    ("scheduler.max_tokens_cap=512", "scheduler.max_tokens_cap: must be >= 1 and < max_len"),
    ("scheduler.max_tokens_cap=0", "scheduler.max_tokens_cap: must be >= 1 and < max_len"),
    ("scheduler.max_queued_requests=0", "scheduler.max_queued_requests: must be >= 1"),
    ("verifier.num_threads=0", "verifier.num_threads: must be >= 1"),
    ("drafter.device=gpu", "drafter.device: expected cpu, cuda or cuda:N"),
    ("drafter.device=cuda:x", "drafter.device: expected cpu, cuda or cuda:N"),
    ("verifier.cpu_cores=-1", "verifier.cpu_cores: must be >= 0"),
    ("server.endpoint=http://x", "server.endpoint: expected tcp://HOST:PORT or ipc://PATH"),
    ("model.tiny_num_kv_heads=3", "model.tiny_num_heads: must be a multiple of tiny_num_kv_heads"),
])
def test_validation_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(message)


def test_valid_devices():
    for device in ("cpu", "cuda", "cuda:0", "cuda:12"):
        assert load_config(overrides=[f"verifier.device={device}"]).verifier.device == device


def test_dict_round_trip():
    config = load_config(TINY_TOML, ["drafter.cpu_cores=0,2", "scheduler.mode=sd"])
    data = config_to_dict(config)
    assert data["drafter"]["cpu_cores"] == [0, 2]
    assert json.loads(json.dumps(data)) == data
    assert config_from_dict(data) == config
    assert config_from_dict({}) == Config()
    with pytest.raises(ConfigError, match="unknown key 'server.port'"):
        config_from_dict({"server": {"port": 1}})
    with pytest.raises(ConfigError, match="scheduler.num_draft: must be in 1..16"):
        config_from_dict({**data, "scheduler": {**data["scheduler"], "num_draft": 99}})


def test_format_config_is_toml_of_the_effective_config():
    config = load_config(TINY_TOML, ['model.target=a "quoted" \\ path'])
    text = format_config(config)
    assert "[scheduler]" in text and 'mode = "psd"' in text
    assert config_from_dict(tomllib.loads(text)) == config


def test_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scheduler.num_draft = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = ModelSection()


def test_direct_construction_is_validated():
    assert WorkerSection(cpu_cores=[0, 1]).cpu_cores == (0, 1)
    with pytest.raises(ConfigError, match="num_draft"):
        SchedulerSection(num_draft=0)
    with pytest.raises(ConfigError, match="scheduler: expected SchedulerSection"):
        Config(scheduler=ModelSection())


def test_run_dirs():
    base = os.path.join(tempfile.gettempdir(), f"minedraft-{os.getuid()}")
    assert default_run_dir("tcp://127.0.0.1:7475") == os.path.join(base, "tcp-127.0.0.1-7475")
    ipc_dir = default_run_dir("ipc:///tmp/x.sock")
    assert os.path.dirname(ipc_dir) == base and len(os.path.basename(ipc_dir)) == len("ipc-") + 12
    assert default_run_dir("ipc:///tmp/y.sock") != ipc_dir
    assert resolve_run_dir(load_config()) == os.path.join(base, "tcp-127.0.0.1-7475")
    custom = load_config(overrides=["server.run_dir=~/md-run"])
    assert resolve_run_dir(custom) == os.path.join(os.path.expanduser("~"), "md-run")


def test_config_module_does_not_import_torch():
    code = "import minedraft.common.config, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_from_memory():
    from minedraft.common.config import MAX_BATCH_FROM_MEMORY, batch_from_memory

    assert batch_from_memory(request_bytes=100, budget_bytes=1000, num_batches=2) == 5
    assert batch_from_memory(request_bytes=100, budget_bytes=1000, num_batches=1) == 10
    assert batch_from_memory(request_bytes=100, budget_bytes=10**9, num_batches=2) == MAX_BATCH_FROM_MEMORY
    assert batch_from_memory(request_bytes=100, budget_bytes=50, num_batches=2) == 1  # at least one request
    sc = load_config(overrides=["scheduler.mode=auto", "scheduler.max_batch=0"]).scheduler
    assert sc.max_rows(8) == 16 and sc.num_batches == 2
    assert load_config(overrides=["scheduler.mode=sd"]).scheduler.max_rows(8) == 8


def test_served_model_names(tmp_path):
    assert load_config(TINY_TOML).server.served_model_names == ()
    for text in ('["tiny", "tiny chat"]', "tiny, tiny chat"):
        config = load_config(TINY_TOML, [f"server.served_model_names={text}"])
        assert config.server.served_model_names == ("tiny", "tiny chat")
        assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
        assert config_from_dict(tomllib.loads(format_config(config))) == config
    path = write_toml(tmp_path, '[server]\nserved_model_names = ["a"]\n')
    assert load_config(path).server.served_model_names == ("a",)
    for bad, message in (('["a", "a"]', "names must differ"), ('["a", ""]', "must be non-empty"),
                         ('[" a"]', "without surrounding spaces"), ("[1]", "expected list of strings")):
        with pytest.raises(ConfigError, match=f"server.served_model_names: .*{message}"):
            load_config(overrides=[f"server.served_model_names={bad}"])
    with pytest.raises(ConfigError, match="expected list of strings"):
        load_config(write_toml(tmp_path, '[server]\nserved_model_names = "a"\n'))
