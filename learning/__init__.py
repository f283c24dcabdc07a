"""The learning loop: offline jobs that read the prediction log and write new model versions.

Never imported by the serving process: `onnxgate retrain` (one shot, a CronJob) and `onnxgate learn`
(the long-running loop, a sidecar or its own Deployment) run beside the gateway and talk to it only
through the model repository (a new version written aside and renamed into place) and, in explicit
mode, RepositoryModelLoad.

    training.py  what a published version keeps so it can be trained again (`<version>/training/`)
    recipes.py   retrain in the model's own ecosystem: sklearn, xgboost, lightgbm, catboost, R, a user function
    stats.py     the significance tests behind every decision: McNemar's exact test, paired bootstrap
    drift.py     live inputs against the training reference: PSI, KS, chi-square per feature
    data.py      training rows: base data + joined feedback, time-ordered windows and held-out slices
    evaluate.py  champion and challenger scored with onnxruntime on their ONNX files
    promote.py   the promotion rule, the decision log, the model card
    retrain.py   `onnxgate retrain`
    learn.py     `onnxgate learn`: triggers, back-off
"""
