"""
nanoGPT-style configuration, stricter. A script's config is its lowercase module-level
assignments of plain literals (`batch_size = 64  # comment`). Then:

    python hipa.py config/fmnist_hipa.py --batch_size=32 --out_dir=out/x --lr=1e-4

applies the config file (plain Python) and then the overrides, in order, to the script's globals.
An unknown key is an error naming the closest valid key; a value of the wrong type is an error
(an int where a float is expected is fine); `--help` lists every key with its default and comment.
"""
import ast
import difflib
import io
import sys
import tokenize


def config_keys(path):
    """{name: (default, comment)} for the top-level `name = <literal>` lines of a source file."""
    with open(path) as f:
        source = f.read()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    keys = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("_") or not name.islower():
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            keys[name] = (value, comments.get(node.end_lineno, ""))
    return keys


def parse_value(text):
    """'3' -> 3, '1e-4' -> 1e-4, '(1,2)' -> (1, 2), 'None' -> None, 'true' -> True, 'a=b' -> 'a=b'."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(key, value, default):
    """The value converted to the default's type, or SystemExit naming the problem."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    elif isinstance(default, str):
        return value if isinstance(value, str) else str(value)
    elif type(value) is type(default):
        return value
    raise SystemExit(f"config error: {key} expects {type(default).__name__} (default {default!r}), got {value!r}")


def unknown(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return SystemExit(f"config error: unknown key '{key}'{hint}")


def print_help(script, keys):
    print(f"usage: python {script} [config/file.py ...] [--key=value ...]\n\nkeys (default, comment):")
    width = max(len(k) for k in keys)
    for k, (v, c) in keys.items():
        print(f"  --{k:<{width}} = {v!r}" + (f"  # {c}" if c else ""))


def configure(g, argv, print_config=True):
    """Apply config files and --key=value overrides in `argv` to the globals dict `g` of the
    script that defines them. Returns the resolved {key: value} config."""
    script = g["__file__"]
    keys = config_keys(script)
    if any(a in ("-h", "--help") for a in argv):
        print_help(script, keys)
        raise SystemExit(0)
    for key, (default, _) in keys.items():  # start from the defaults, so that main() can be called again
        g[key] = default
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"config error: '{arg}' is not of the form --key=value")
            updates = {key: parse_value(text)}
        else:
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file {arg} ({e.strerror})")
            updates = {}
            exec(compile(source, arg, "exec"), {"__file__": arg}, updates)  # (__file__: to include a base config)
            updates = {k: v for k, v in updates.items() if not k.startswith("_") and not isinstance(v, type(sys))}
        for key, value in updates.items():
            if key not in keys:
                raise unknown(key, keys)
            g[key] = coerce(key, value, keys[key][0])
    config = {k: g[k] for k in keys}
    if print_config:
        print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
    return config
