"""The config system: what a user types on the command line lands in the script, or fails loudly."""
import pytest

from configurator import configure, parse_value

SCRIPT = '''
out_dir = "out/x"  # where things go
batch_size = 64  # global batch
lr = 1e-4  # learning rate
compile = False  # torch.compile
betas = (0.9, 0.99)  # Adam betas
lora = None  # optional path
NOT_A_KEY = 3
_private = 1
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    g = {"__file__": str(path)}
    exec(SCRIPT, g)
    return g


def test_overrides_and_config_file_apply_in_order(script, tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("batch_size = 8\nlr = 3e-4\nimport math\n")
    cfg = configure(script, [str(cfg_file), "--batch_size=16", "--compile=True"], print_config=False)
    assert cfg == {"out_dir": "out/x", "batch_size": 16, "lr": 3e-4, "compile": True, "betas": (0.9, 0.99),
                   "lora": None}
    assert script["batch_size"] == 16 and script["lr"] == 3e-4



def test_a_config_file_can_start_from_another_beside_it(script, tmp_path):
    (tmp_path / "base.py").write_text("batch_size = 8\nlr = 3e-4\n")
    (tmp_path / "task.py").write_text('import os\nexec(open(os.path.join(os.path.dirname(__file__), "base.py")).read())\n'
                                      'lr = 1e-3\n')
    cfg = configure(script, [str(tmp_path / "task.py")], print_config=False)
    assert (cfg["batch_size"], cfg["lr"]) == (8, 1e-3)  # the base's value, and the task's override of the base

def test_value_types(script):
    cfg = configure(script, ["--lr=1", "--betas=[0.0,0.99]", "--out_dir=a=b", "--lora=path/x.safetensors"],
                    print_config=False)
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)  # int where a float is expected is fine
    assert cfg["betas"] == (0.0, 0.99)  # a list given for a tuple default becomes a tuple
    assert cfg["out_dir"] == "a=b"  # values may contain '='
    assert cfg["lora"] == "path/x.safetensors"  # None defaults take any value
    assert parse_value("None") is None and parse_value("false") is False and parse_value("(1, 2)") == (1, 2)


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=3"], "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
    (["--NOT_A_KEY=3"], "unknown key 'NOT_A_KEY'"),
    (["--batch_size=1.5"], "batch_size expects int"),
    (["--compile=1"], "compile expects bool"),
    (["--lr=fast"], "lr expects float"),
    (["--batch_size"], "not of the form --key=value"),
    (["missing_config.py"], "cannot read config file missing_config.py"),
])
def test_bad_input_is_one_clear_error(script, argv, message):
    with pytest.raises(SystemExit) as e:
        configure(script, argv, print_config=False)
    assert message in str(e.value.code)


def test_unknown_key_in_config_file(script, tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("learning_rate = 1e-3\n")
    with pytest.raises(SystemExit, match="unknown key 'learning_rate'"):
        configure(script, [str(cfg_file)], print_config=False)


def test_help_lists_every_key_with_default_and_comment(script, capsys):
    with pytest.raises(SystemExit) as e:
        configure(script, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ["--batch_size = 64  # global batch", "--lora", "= None  # optional path", "--betas"]:
        assert line in out
    assert "NOT_A_KEY" not in out and "_private" not in out


def test_each_call_starts_from_the_defaults(script):
    configure(script, ["--batch_size=16"], print_config=False)
    cfg = configure(script, ["--lr=2e-4"], print_config=False)  # e.g. a test calling main() twice
    assert cfg["batch_size"] == 64
