"""Model card templates (Jinja2), shipped inside the package as ``hf_activelr.model_cards``."""
