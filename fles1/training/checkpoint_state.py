"""Callback state that travels with Trainer checkpoints: ``<output_dir>/checkpoint-<step>/<STATE_FILE>``."""

from __future__ import annotations

import json
import os

from fles1.atomic import atomic_open


class CheckpointStateMixin:
    """For a TrainerCallback with ``state_dict()`` / ``load_state_dict()``: saved in every checkpoint folder,
    read back from the one training resumes from (``resume_from``, else the standard layout)."""

    STATE_FILE: str = "callback_state.json"
    resume_from: str | None = None

    def checkpoint_folder(self, args, state) -> str:
        return self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def load(self, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, self.STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as handle:
            self.load_state_dict(json.load(handle))
        return True

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            # atomic: its presence marks the checkpoint complete (fles1.training.trainer.resolve_resume)
            with atomic_open(os.path.join(folder, self.STATE_FILE)) as handle:
                json.dump(self.state_dict(), handle, indent=1)
