"""dogbreeds: Stanford Dogs on Ray Train, Ray Tune and Ray Serve."""

import os

# Keras 3 models fail under MultiWorkerMirroredStrategy with more than one Ray Train worker;
# tf-keras works. `tf.keras` must mean tf-keras in every process, before TensorFlow loads.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ info and warning lines drown the progress of a run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Ray Train's controller polls its workers every 2 s by default and so sees a run end up to
# 4 s late; our runs are many and short (every cnn3v2 trial is one), so poll every 0.5 s.
# Ray Train passes the setting on to its controller; a user's own value wins.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

__version__ = "0.1.0"
