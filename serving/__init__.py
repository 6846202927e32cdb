"""BentoML scoring service with SHAP explanations, access control and an audit trail."""
