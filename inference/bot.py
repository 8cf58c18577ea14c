"""Chat with a fine-tuned model in the terminal (OpenChatKit's bot.py).

python inference/bot.py --model outputs/demo/hf
printf 'What is 2 + 3?\\n' | python inference/bot.py --model outputs/demo/hf --no-sample
"""

from chatkit.bot import main

if __name__ == "__main__":
    main()
