"""Training, fine-tuning, distillation and evaluation with the paper's recipe (timm parts, DDP-ready).

    from t2t_vit.train import TrainConfig, train, evaluate
    metrics = train(TrainConfig(data="digits", epochs=5, output="runs/demo"))
"""
from t2t_vit.train.config import TrainConfig, list_recipes, load_config
from t2t_vit.train.engine import train
from t2t_vit.train.evaluate import evaluate, load_weights, model_from_checkpoint

__all__ = ["TrainConfig", "evaluate", "list_recipes", "load_config", "load_weights", "model_from_checkpoint", "train"]
