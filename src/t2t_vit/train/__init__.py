"""Training, fine-tuning, distillation and evaluation with the paper's recipe (timm parts, DDP-ready).

    from t2t_vit.train import load_config, train, evaluate
    metrics = train(load_config("digits", dict(epochs=5, output="runs/demo")))
"""
from t2t_vit.checkpoint import model_from_checkpoint
from t2t_vit.train.config import TrainConfig, ValidConfig, list_recipes, load_config
from t2t_vit.train.engine import train
from t2t_vit.train.evaluate import evaluate

__all__ = ["TrainConfig", "ValidConfig", "evaluate", "list_recipes", "load_config", "model_from_checkpoint", "train"]
