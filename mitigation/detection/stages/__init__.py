"""The detection stages, one module each; ``detection.pipeline`` runs them in order."""
