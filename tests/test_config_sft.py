"""The SFT config: YAML + `key=value` overrides, and every mistake caught before a model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from reasonguard.errors import UserError
from reasonguard.train.config import (
    SFTConfig,
    apply_overrides,
    field_names,
    load_config,
    read_yaml,
    save_config,
)
from test_train_support import REPO, tiny_config

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
EXPECTED_CONFIGS = {
    "demo-cpu.yaml",
    "exp19-qlora-3b-instruct.yaml",
    "guardreasoner-rsft-1b.yaml",
    "guardreasoner-rsft-3b.yaml",
    "guardreasoner-rsft-8b.yaml",
    "exp19-hsdpo-qlora-3b.yaml",
    "guardreasoner-hsdpo-1b.yaml",
    "guardreasoner-hsdpo-3b.yaml",
    "guardreasoner-hsdpo-8b.yaml",
}


def stage_of(path: Path) -> str:
    """The training stage a shipped config is for (`sft` or `dpo`), from its file name."""
    return "dpo" if "hsdpo" in path.name else "sft"


def config_class(path: Path) -> type:
    from reasonguard.train.dpo.stage import DPOConfig

    return DPOConfig if stage_of(path) == "dpo" else SFTConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_with_yaml_scalar_semantics(tmp_path: Path) -> None:
    path = write(tmp_path, "learning_rate: 5e-5\nlora_r: 8\nsplits: [AegisTrainR]\n")
    config = load_config(
        path, ["lora_r=32", "bf16=true", "max_length=auto", "lora_target_modules=q_proj,v_proj"]
    )
    assert config.learning_rate == 5e-5  # YAML 1.1 reads `5e-5` as a string: coerced to float
    assert isinstance(config.learning_rate, float)
    assert config.lora_r == 32 and config.bf16 is True and config.max_length == "auto"
    assert config.splits == ["AegisTrainR"]
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert load_config(path, ["max_length=1536", "save_total_limit=null"]).save_total_limit is None


def test_overrides_do_not_mutate_the_input() -> None:
    data = {"lora_r": 8, "nested": {"a": 1}}
    out = apply_overrides(data, ["lora_r=4", "nested.a=2"])
    assert data == {"lora_r": 8, "nested": {"a": 1}}
    assert out == {"lora_r": 4, "nested": {"a": 2}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "learnig_rate=1e-4",
            ["unknown config key 'learnig_rate'", "did you mean 'learning_rate'"],
        ),
        ("lora.r=8", ["unknown config key 'lora'", "allowed keys: model_name_or_path"]),
        ("finetuning=qlor", ["'finetuning'", "allowed values: full, lora, qlora"]),
        ("optim=adam", ["'optim'", "paged_adamw_32bit"]),
        ("lr_scheduler_type=cosin", ["'lr_scheduler_type'", "cosine, linear"]),
        ("prompt_format=chatml", ["'prompt_format'", "raw, chat, chat-user"]),
        ("save_strategy=always", ["'save_strategy'", "steps, epoch, both, no"]),
        ("learning_rate=fast", ["'learning_rate'", "expected a number"]),
        ("lora_r=1.5", ["'lora_r'", "expected an integer"]),
        ("gradient_checkpointing=maybe", ["'gradient_checkpointing'", "true/false"]),
        ("max_length=huge", ["'max_length'", "auto"]),
        ("lora_r=0", ["'lora_r'", "at least 1"]),
        ("eval_split_ratio=0.7", ["'eval_split_ratio'", "[0, 0.5)"]),
        ("warmup_steps=1.5", ["'warmup_steps'", "fraction"]),
        ("chat_template=llama2", ["'chat_template'", "llama3"]),
        ("effective_batch_size=7", ["'effective_batch_size'", "multiple"]),
        ("bogus", ["must look like key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_allowed_values(
    tmp_path: Path, override: str, expected: list[str]
) -> None:
    path = write(tmp_path, "per_device_train_batch_size: 2\n")
    with pytest.raises(UserError) as info:
        load_config(path, [override])
    for text in expected:
        assert text in str(info.value)


def test_bad_key_in_the_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "num_epochs: 3\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown config key 'num_epochs'"):
        load_config(path)


def test_cross_field_rules(tmp_path: Path) -> None:
    path = write(tmp_path, "eval_split_ratio: 0\n")
    with pytest.raises(UserError, match="eval_strategy"):
        load_config(path)
    assert load_config(path, ["eval_strategy=no"]).eval_split_ratio == 0
    with pytest.raises(UserError, match="contradicts effective_batch_size"):
        SFTConfig(
            per_device_train_batch_size=4, effective_batch_size=64, gradient_accumulation_steps=8
        )
    config = SFTConfig(per_device_train_batch_size=6, effective_batch_size=384)
    assert config.accumulation_steps == 64 and config.samples_per_step == 384


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, learning_rate=3e-4, splits=["train"])
    path = save_config(config, tmp_path / "resolved.yaml", header="# hello")
    assert path.read_text().startswith("# hello\n")
    assert load_config(path) == config
    assert list(read_yaml(path)) == field_names()


def test_cli_rejects_bad_config_before_any_model_loads(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    path = write(tmp_path, f"output_dir: {tmp_path / 'run'}\n")
    code, out, err = cli("train", "sft", "--config", path, "learnig_rate=1e-4")
    assert code == 2
    assert "unknown config key 'learnig_rate'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cuda_only_settings_fail_before_anything_loads_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from reasonguard.train.sft import run_sft

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for override, text in (
        ({"attn_implementation": "flash_attention_2"}, "flash_attention_2 needs CUDA"),
        ({"use_liger_kernel": True}, "use_liger_kernel: true needs a CUDA GPU"),
    ):
        config = tiny_config(tmp_path, **override)
        with pytest.raises(UserError, match=text):
            run_sft(config)
        assert not Path(config.output_dir).exists()


def test_every_shipped_config_loads_and_opens_with_its_command() -> None:
    assert {p.name for p in SHIPPED} >= EXPECTED_CONFIGS
    for path in SHIPPED:
        first = path.read_text().splitlines()[0]
        stage = stage_of(path)
        assert first == f"# reasonguard train {stage} --config configs/{path.name}", path.name
        config = load_config(path, cls=config_class(path))
        assert config.output_dir == f"runs/{path.stem}"


def test_recipe_configs_carry_the_published_settings() -> None:
    exp19 = load_config(REPO / "configs/exp19-qlora-3b-instruct.yaml")
    assert (exp19.finetuning, exp19.prompt_format, exp19.optim) == (
        "qlora",
        "chat",
        "paged_adamw_32bit",
    )
    assert (exp19.lora_r, exp19.lora_alpha, exp19.lora_dropout) == (16, 16, 0.05)
    assert exp19.samples_per_step == 128 and exp19.warmup_steps == 100
    assert (exp19.eval_strategy, exp19.eval_steps, exp19.save_strategy, exp19.save_total_limit) == (
        "steps",
        500,
        "epoch",
        3,
    )
    for size in ("1b", "3b", "8b"):
        rsft = load_config(REPO / f"configs/guardreasoner-rsft-{size}.yaml")
        assert (rsft.finetuning, rsft.prompt_format, rsft.chat_template) == (
            "full",
            "chat-user",
            "llama3",
        )
        assert (rsft.max_length, rsft.learning_rate, rsft.warmup_steps) == (2048, 5e-5, 0)
        assert (rsft.samples_per_step, rsft.num_train_epochs, rsft.max_grad_norm) == (384, 3, 1.0)
        assert rsft.lr_scheduler_type == "cosine" and rsft.bf16 is True
        hsdpo = load_config(
            REPO / f"configs/guardreasoner-hsdpo-{size}.yaml", cls=config_class(Path("hsdpo"))
        )
        assert hsdpo.model_name_or_path == f"runs/guardreasoner-rsft-{size}/final"
        assert (hsdpo.finetuning, hsdpo.prompt_format) == (rsft.finetuning, rsft.prompt_format)
        assert (hsdpo.beta, hsdpo.loss_type, hsdpo.pref_ftx) == (0.01, "sigmoid", 2.0)
        assert (hsdpo.learning_rate, hsdpo.num_train_epochs, hsdpo.samples_per_step) == (
            5e-6,
            2,
            256,
        )
    exp19_dpo = load_config(
        REPO / "configs/exp19-hsdpo-qlora-3b.yaml", cls=config_class(Path("hsdpo"))
    )
    assert exp19_dpo.model_name_or_path == "runs/exp19-qlora-3b-instruct/final"
    assert (exp19_dpo.finetuning, exp19_dpo.init_adapter, exp19_dpo.prompt_format) == (
        "qlora",
        "continue",
        exp19.prompt_format,
    )
    assert (exp19_dpo.beta, exp19_dpo.pref_ftx, exp19_dpo.samples_per_step) == (0.01, 2.0, 256)
