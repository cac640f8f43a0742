"""The configs of the user seeds (shared/seeds/), verbatim, shared by the trainer tests."""

# Seed 000: textual inversion config, as written in the user's README.
SEED_000_TI = """\
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 5
gradient_accumulation_steps = 1
gradient_checkpointing = true
huber_c = 0.1
huber_schedule = "snr"
init_word = "woman"
learning_rate = 1e-4
logging_dir = "kohya_ss/dataset/logs"
loss_type = "l2"
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 500
max_bucket_reso = 1536
max_data_loader_n_workers = 0
max_timestep = 1000
max_token_length = 75
max_train_steps = 5200
mem_eff_attn = true
min_bucket_reso = 256
mixed_precision = "bf16"
multires_noise_discount = 0.3
no_half_vae = true
noise_offset_type = "Original"
num_vectors_per_token = 1
optimizer_type = "AdamW"
output_dir = "/home/user/kohya_ss/dataset/outputs"
output_name = "yourtoken_final.safetensors"
pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
prior_loss_weight = 0
resolution = "1024,1536"
sample_prompts = "/home/user/kohya_ss/dataset/logs/prompt.txt"
sample_dir = "/home/user/kohya_ss/dataset/outputs/samples"
sample_sampler = "k_dpm_2"
sample_every_n_steps = 1000
sample_batch_size = 1
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "bf16"
sdpa = true
token_string = "yourtoken"
train_batch_size = 1
train_data_dir = "kohya_ss/dataset/images"
"""

# Seed 000: the "resume" variant (with the non-kohya key resume_from).
SEED_000_TI_RESUME = """\
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 2
gradient_accumulation_steps = 1
gradient_checkpointing = true
huber_c = 0.1
huber_schedule = "snr"
learning_rate = 1e-5
logging_dir = "kohya_ss/dataset/logs"
loss_type = "l2"
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 500
max_bucket_reso = 1536
max_data_loader_n_workers = 0
max_timestep = 1000
max_token_length = 75
max_train_steps = 3200
mem_eff_attn = true
min_bucket_reso = 256
mixed_precision = "bf16"
multires_noise_discount = 0.3
no_half_vae = true
noise_offset_type = "Original"
num_vectors_per_token = 1
optimizer_type = "AdamW"
output_dir = "/home/user/kohya_ss/dataset/outputs"
output_name = "yourtoken_final_refined"
resume_from = "/home/user/kohya_ss/dataset/outputs/yourtoken_final-000002.safetensors"
pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
prior_loss_weight = 0
resolution = "1024,1536"
sample_prompts = "/home/user/kohya_ss/dataset/logs/prompt.txt"
sample_dir = "kohya_ss/dataset/outputs/samples"
sample_sampler = "k_dpm_2"
sample_every_n_steps = 500
sample_batch_size = 1
save_every_n_steps = 500
save_model_as = "safetensors"
save_precision = "bf16"
sdpa = true
token_string = "yourtoken"
train_batch_size = 1
train_data_dir = "kohya_ss/dataset/images"
"""

# Seed 003: LoRA config.toml (bmaltais GUI keys included), comments kept.
SEED_003_LORA = """\
pretrained_model_name_or_path = "data/waiNSFW_v14.safetensors"
train_data_dir = "data/images"
# reg_data_dir = "/home/lumi/code/kohya_ss/data/reg"
output_dir = "data/output"
logging_dir = "data/logs"
output_name = "nazuna"

# in comfyui set: lora_strength = 0.80
LoRA_type = "Standard"

# [Option 1] better results, manual learning rate
optimizer_type = "AdamW" # or AdamW8bit
lr_scheduler = "constant" # or cosine
# optimizer_args = ["betas=0.9,0.99", "weight_decay=0.01"]
learning_rate = 3e-5 # [3e-6; 8e-5]

max_train_steps = 4000
# max_train_epochs = 50
network_alpha = 32 # try [1, 4, 16]
network_dim = 32
max_token_length = 225

mixed_precision = "fp16"
save_precision = "fp16"

resolution = "1024,1024"
max_resolution = "1024,1024"
caption_extension = ".txt"

save_every_n_epochs = 1
train_batch_size = 2
gradient_accumulation_steps = 1

cache_latents = true
cache_latents_to_disk = true
cache_text_encoder_outputs = true
cache_text_encoder_outputs_to_disk = true

lowvram = true
gradient_checkpointing = true
network_train_unet_only = true

xformers = true
flip_aug = true

enable_bucket = true
min_bucket_reso = 704
max_bucket_reso = 2048
bucket_reso_steps = 64

network_module = "networks.lora"
"""

# Seed 001: the two kohya command lines (full fine-tune and LoRA), as pasted by the user.
SEED_001_FINETUNE = (
    "accelerate launch  --mixed_precision bf16 --num_cpu_threads_per_process 4 sdxl_train.py "
    "--pretrained_model_name_or_path=/mnt/g/ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors "
    "--output_dir=/mnt/g/zhuoyueai/model --logging_dir=/mnt/g/zhuoyueai/log --dataset_config=zhuoyueaiXL.toml "
    "--learning_rate=5e-6 --min_bucket_reso=256 --max_bucket_reso=4096 --save_model_as=safetensors "
    "--output_name=zhuoyueaiXL --lr_scheduler=constant_with_warmup --lr_warmup_steps=0 --train_batch_size=4 "
    "--gradient_checkpointing --max_train_steps=10000000 --save_every_n_epochs=1 --save_state "
    "--mixed_precision=bf16 --save_precision=bf16 --no_half_vae --cache_text_encoder_outputs_to_disk "
    "--cache_latents_to_disk --optimizer_type=Adafactor "
    '--optimizer_args="scale_parameter=False","relative_step=False","warmup_init=False" '
    "--max_data_loader_n_workers=0 --xformers --bucket_reso_steps=32 --min_snr_gamma=5 --noise_offset=0.0357 "
    "--adaptive_noise_scale=0.00357 --max_token_length=225 --bucket_no_upscale --sample_sampler=euler_a "
    "--sample_prompts=/mnt/g/loraimages/zhuoyueai/model/sample/prompt.txt --sample_every_n_steps=5000 --full_bf16"
)
SEED_001_LORA = (
    "accelerate launch  --mixed_precision bf16 --num_cpu_threads_per_process 4 sdxl_train_network.py "
    "--pretrained_model_name_or_path=/mnt/g/ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors "
    "--output_dir=/mnt/g/loraimages/zhuoyueai/model --logging_dir=/mnt/g/loraimages/zhuoyueai/log "
    "--dataset_config=yuzhaiaiXL_lora.toml --learning_rate=1e-6 --min_bucket_reso=256 --max_bucket_reso=4096 "
    "--save_model_as=safetensors --output_name=yuzhaiaiXL_lora_upscale --lr_scheduler=constant_with_warmup "
    "--lr_warmup_steps=0 --train_batch_size=3 --max_train_steps=10000000 --save_every_n_epochs=1 "
    "--gradient_checkpointing --cache_latents_to_disk --mixed_precision=bf16 --save_precision=bf16 --no_half_vae "
    "--optimizer_type=Adafactor --bucket_no_upscale --sample_sampler=euler_a "
    "--sample_prompts=/mnt/g/loraimages/zhuoyueai/model/sample/prompt.txt --sample_every_n_steps=400 "
    "--masked_loss --network_module=networks.lora"
)

# Seed 001's dataset TOMLs (full fine-tune with metadata JSON, LoRA with image masking), paths as fields.
SEED_001_FINETUNE_DATASET = """\
[general]
shuffle_caption = false
enable_bucket = true

[[datasets]]
resolution = 1024
[[datasets.subsets]]
image_dir = "{image_dir}"
metadata_file = "{metadata}"
num_repeats = 10
"""
SEED_001_LORA_DATASET = """\
[general]
shuffle_caption = false
enable_bucket = true

[[datasets]]
resolution = 1024

[[datasets.subsets]]
image_dir = "{image_dir}"
caption_extension = '.txt'
conditioning_data_dir = "{mask_dir}"
num_repeats = 100
"""
