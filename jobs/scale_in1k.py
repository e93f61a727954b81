"""The main Ray job (same as `realfake run`): real dataset → synthetic dataset → trained, evaluated classifier.

On a laptop (starts a local Ray bound to 127.0.0.1):
    python jobs/scale_in1k.py --preset tiny --mult 10 --out runs/demo
On a cluster:
    ray job submit --working-dir . -- python jobs/scale_in1k.py --config jobs/configs/in1k.yaml --mult 10 \\
        --out s3://bucket/realfake/in1k
Resubmitting the same command resumes: complete stages are skipped.
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("run")
