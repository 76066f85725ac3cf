"""CIFAR-100 / OOD Kaggle competition pipeline: folds -> models -> submissions.

Stages (each reads only what the previous one wrote to disk):
    python -m competition.folds     --dataset digits
    python competition/train.py     --part 1 --fold 0 --preset demo
    python -m competition.predict   models/<run>
    python -m competition.ensemble  --runs 'models/*' --name demo
    python -m competition.score     submissions/demo.json
    python -m competition.submit    submissions/demo.csv -m "message"
"""

__version__ = "0.1.0"
