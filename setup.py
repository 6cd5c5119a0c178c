from setuptools import find_packages, setup

setup(
    name="minirlhf",
    version="0.1.0",
    description="RLHF from scratch on NumPy/CuPy: autograd, GPT, SFT, reward models, REINFORCE-with-KL and DPO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minirlhf", "minirlhf.*"]),
    package_data={"minirlhf": ["data/shakespeare/*.txt", "data/shakespeare/NOTICE.md"]},
    install_requires=["numpy>=1.24", "tqdm>=4.60"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.70", "safetensors>=0.4", "jinja2>=3.1"],
        "hf": ["safetensors>=0.4", "jinja2>=3.1"],   # jinja2: a folder's chat template (minirlhf.chat)
        "gpu": ["cupy-cuda12x>=13"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["minirlhf=minirlhf.cli:main"]},
)
