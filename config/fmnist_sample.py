# The demo's evaluation sets on the tiny teacher: 50 images for each of the 10 class prompts.
model = "assets/tiny-sd-fmnist"
prompts = "config/fmnist_prompts.txt"
num_per_prompt = 50
guidance = 2.0
seed = 1000000  # outside the seeds HiPA trained on (0 .. num_examples-1)
batch_size = 100
teacher_steps = 15  # compare=True: the teacher column is the 15-step DDIM HiPA distils
