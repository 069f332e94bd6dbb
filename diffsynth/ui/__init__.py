"""The web UI, `diffsynth ui` (optional extra: pip install 'diffsynth-flux[ui]').

files.py (the folders it may use, uploads), jobs.py (generation: queue, progress, Stop, PNGs), conditions.py
(the Edit tab's model side), training.py (`diffsynth train` in a subprocess), app.py (the Gradio page),
launch.py (command line, model loading, serving). Only app.py imports gradio.
"""
