# HiPA for one-step text-guided editing (SDEdit), an extension: the paper reuses the t2i adaptor for editing
# (sample.py --strength with config/fmnist_hipa.py's adaptor); this trains one for it on the t2i teacher. Each
# example's Fashion-MNIST train image is encoded and noised to t = strength x T; the student's one step from there
# is matched to the teacher's 15 steps from the same point, both toward a caption of another image
# (edit_captions = "other"; "own" trains re-generation with the image's own caption instead).
#   python hipa.py config/fmnist_hipa_edit.py
#   python sample.py --init_images=DIR --strength=0.8 --steps=1 --lora=out/hipa-fmnist-edit/pytorch_lora_weights.safetensors
# the t2i run's settings (measured there), then:
import os
exec(open(os.path.join(os.path.dirname(__file__), "fmnist_hipa.py")).read())
task = "edit"
strength = 0.8  # make demo-tasks' editing strength (diffusers img2img's default)
edit_captions = "other"
out_dir = "out/hipa-fmnist-edit"
