"""dogbreeds: Stanford Dogs on Ray Train, Ray Tune and Ray Serve."""

import os

# Keras 3 models fail under MultiWorkerMirroredStrategy with more than one Ray Train worker;
# tf-keras works. `tf.keras` must mean tf-keras in every process, before TensorFlow loads.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ info and warning lines drown the progress of a run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
