"""Language-model collection: ``LLMCollector``, labelled prompts, offline model loading."""

from interlatent.llm.collector import BUILTIN_METRICS, LLMCollector
from interlatent.llm.dataset import PromptDataset, PromptExample
from interlatent.llm.loading import hooked_from_hf, load_model

__all__ = ["BUILTIN_METRICS", "LLMCollector", "PromptDataset", "PromptExample", "hooked_from_hf", "load_model"]

from interlatent.llm.demo_model import DemoModelConfig, demo_model  # noqa: E402

__all__ += ["DemoModelConfig", "demo_model"]
