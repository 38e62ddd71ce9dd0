"""`slm sample ckpt_path=... prompt="..."`: print continuations of a prompt."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="sample")
@report_errors
def main(cfg: DictConfig) -> list[str]:
    from slm_cli.evaluate.sample import sample

    texts = sample(str(cfg.ckpt_path), str(cfg.prompt), max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, num_samples=cfg.num_samples,
                   stop_at_eos=cfg.stop_at_eos, device=cfg.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(f"{cfg.prompt}{text}")
    return texts
