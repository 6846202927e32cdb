"""MLflow "models from code" entry of the riskscore pyfunc: MLflow runs this file to build the model object.

Logging the model by this file's path (instead of a Python object) keeps pickles out of the logged model: the
artifact holds this source, the bundle directory (``booster.txt`` + ``bundle.json``) and the MLmodel metadata.
"""

from mlflow.models import set_model

from training.pyfunc import RiskModel

set_model(RiskModel())
