"""CIFAR-100 / OOD Kaggle competition pipeline: folds -> models -> submissions.

Stages (each reads only what the previous one wrote to disk; every one runs as
`python -m competition.<stage>`, and `--help` prints its commands):

    folds      python -m competition.folds --dataset digits             -> folds/<dataset>.csv
    train      python competition/train.py --part 1 --preset demo       -> models/<run>/
    predict    python -m competition.predict models/<run> --ood-dir D   -> models/<run>/ood*/, oof_tta_logits.npy
    ensemble   python -m competition.ensemble 'models/*' --name N --ood-dir D -> submissions/N.csv, N.json
    score      python -m competition.score suite --out D ...; score models/<run> N.json --ood-dir D
    submit     python -m competition.submit --check N.csv; submit N.csv -m "message" --competition SLUG
    ablate     python -m competition.ablate weight_decay --budget       -> models/ablations/<study>/

Modules, from the stages down to the leaves (each imports only modules below it):

    ablate     studies: variants of one setting, trained by train, a report       (train, runs, config, plots)
    train      the training loop, top to bottom                                   (runs, loader, models, optim, tta, ...)
    predict    TTA logits of runs on test / OOF / OOD images                      (runs, loader, tta, adapt, runtime)
    score      local OOD suite and reports                                        (runs, metrics, corruptions, plots)
    ensemble   member weights and the submission CSV + JSON                       (runs, metrics, submit)
    runs       a run folder's files (RunDir), run discovery, ensemble members     (models, folds, config, data)
    submit     CSV format: write, check, send to Kaggle                           (data)
    folds      the k-fold split CSV                                               (data)
    corruptions  the 19 x 5 CIFAR-C corruptions, in the OOD file format           (data, plots)
    models     architectures by name (+ mobilenets)       tta  TTA views and logits (augment)
    optim      optimizers and timm schedules             loader  uint8 arrays -> batches
    augment    to_input, batched flips, CPU pipelines    adapt  test-time BN adaptation
    metrics    accuracy, log-loss, ECE, OOD tables       runtime  Accelerator, precision
    config     YAML presets and overrides                plots  every figure
    data       data sources and OOD files                files  errors, atomic writes
"""

__version__ = "0.1.0"
