import pytest

from lm.config.load import config_from_toml_text, load_config, to_toml
from lm.config.schema import Config, ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_typo_in_file_names_file_key_and_closest_key(tmp_path):
    path = write(tmp_path, "[model]\nn_layers = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "'model.n_layers'" in msg and "did you mean 'model.n_layer'" in msg
    assert "\n" not in msg


def test_unknown_section_and_override_typo():
    with pytest.raises(ConfigError, match="unknown section 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match="override 'optim.weight_decy=1'.*did you mean 'optim.weight_decay'"):
        load_config(None, ["optim.weight_decy=1"])


@pytest.mark.parametrize("override, fragment", [
    ("model.n_head=5", "model.n_embd = 384 is not divisible by model.n_head = 5"),
    ("train.max_steps=abc", "'train.max_steps' must be int"),
    ("model.bias=1", "'model.bias' must be bool"),
    ("model.dropout=1.5", "model.dropout = 1.5 must be in [0, 1)"),
    ("data.tokenizer=wordpiece", "data.tokenizer is 'wordpiece'; choose one of bpe, char"),
    ("model.preset=gpt3", "unknown model.preset 'gpt3'"),
    ("train.batch_size=0", "train.batch_size = 0 must be >= 1"),
])
def test_impossible_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path, '[train]\nmax_steps = 10\nout_dir = "a"\n[data]\ninputs = ["x"]\n')
    cfg = load_config(path, ["train.max_steps=20", "train.out_dir=runs/b", "optim.lr=3e-4",
                             'data.inputs=["p", "q"]', "model.bias=false"])
    assert cfg.train.max_steps == 20 and cfg.train.out_dir == "runs/b"
    assert cfg.optim.lr == 3e-4 and cfg.data.inputs == ["p", "q"] and cfg.model.bias is False


def test_resolved_config_round_trips_through_toml():
    cfg = load_config(None, ["model.preset=gpt2-350m", 'data.inputs=["a \\"quoted\\" path"]', "optim.lr=1e-4"])
    assert config_from_toml_text(to_toml(cfg), "saved") == cfg
    assert config_from_toml_text(to_toml(Config()), "saved") == Config()


@pytest.mark.slow
def test_cli_config_typo_is_one_line_with_exit_code_2(cli, tmp_path):
    path = write(tmp_path, "[train]\nmax_step = 3\n")
    r = cli("train.py", path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0] and "train.max_steps" in lines[0]
